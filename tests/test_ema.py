"""EMA of the weights (``transfusion.lightning.ema``): the update and its warm-up against a hand computation;
checkpoints hold the raw weights and every EMA; validation, evaluations, test, predict, export and save_pretrained
use the EMA, the raw weights stay reachable; a run killed with SIGKILL resumes to the same raw and EMA weights."""

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from transfusion.cli import cli_main
from transfusion.lightning.ema import EMA, ema_decay, select_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lightning_configs"


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _network(module) -> dict:
    return {f"model.{n}": p.detach().clone() for n, p in module.model.named_parameters()}


# ----------------------------------------------------------------------------------------------------------
# the average

def test_update_and_warmup_against_a_hand_computation():
    assert ema_decay(0, 0.999) == pytest.approx(0.1) and ema_decay(9, 0.999) == pytest.approx(10 / 19)
    assert ema_decay(90, 0.9) == 0.9 and ema_decay(0, 0.9, warmup=False) == 0.9
    torch.manual_seed(0)
    module, trainer = SimpleNamespace(model=torch.nn.Linear(3, 2)), SimpleNamespace(global_step=0)
    ema = EMA(decay=0.2, start_step=2, every_n_steps=2)  # copy after step 2, updates after 4, 6, 8
    hand, n = None, 0
    for step in range(9):
        trainer.global_step = step
        with torch.no_grad():
            module.model.weight.mul_(-1.5).add_(0.25 * step)  # new weights every step
        ema.step(trainer, module)
        ema.step(trainer, module)  # a second call at the same step (before an evaluation) changes nothing
        w = module.model.weight.detach().clone()
        if step == 2:
            hand = w
        elif step > 2 and step % 2 == 0:
            d = min(0.2, (1 + n) / (10 + n))  # 0.1, 0.1818, 0.2 (the cap)
            hand, n = d * hand + (1 - d) * w, n + 1
        if hand is None:
            assert ema.weights is None
        else:
            torch.testing.assert_close(ema.weights["model.weight"], hand, rtol=0, atol=1e-6)
    assert (ema.updates, ema.last_step) == (3, 8)
    raw, average = module.model.weight.detach().clone(), ema.weights["model.weight"].clone()
    ema.swap(module)  # exact both ways
    assert torch.equal(module.model.weight, average) and module.weights_source == "ema_0.2"
    ema.swap(module)
    assert torch.equal(module.model.weight, raw) and torch.equal(ema.weights["model.weight"], average)


def test_bad_options_sharding_and_name_clashes_are_refused():
    from transfusion.lightning.parallel import FSDP2Strategy

    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="every_n_steps"):
        EMA(every_n_steps=0)
    with pytest.raises(ValueError, match="reserved"):
        EMA(name="raw")
    ema = EMA()
    with pytest.raises(ValueError, match="cannot be sharded.*FSDP2Strategy"):  # FSDP2: refused before any copy
        ema.setup(SimpleNamespace(strategy=FSDP2Strategy(), callbacks=[ema]), None, "fit")
    with pytest.raises(ValueError, match="distinct names"):
        ema.setup(SimpleNamespace(strategy=None, callbacks=[ema, EMA()]), None, "fit")
    with pytest.raises(ValueError, match="TransfusionModule or ChameleonModule"):
        ema.setup(SimpleNamespace(strategy=None, callbacks=[ema]), torch.nn.Linear(1, 1), "fit")
    checkpoint = {"state_dict": {"model.w": torch.zeros(1)}, "ema": {"ema_0.9": {"model.w": torch.ones(1)}}}
    with pytest.raises(ValueError, match="holds the EMAs \\['ema_0.9'\\]"):
        select_weights(checkpoint, "ema_0.5")
    assert select_weights(checkpoint, "raw") == "raw" and checkpoint["state_dict"]["model.w"] == 0
    assert select_weights(checkpoint) == "ema_0.9" and checkpoint["state_dict"]["model.w"] == 1
    assert select_weights({"state_dict": {}}) == "raw"  # a checkpoint without EMA: its weights


# ----------------------------------------------------------------------------------------------------------
# through the CLI: a 4-step debug Transfusion with two EMAs

def _args(root: Path, tokenizer: str, autoencoder: str, steps: int = 4) -> list[str]:
    return ["--config", str(CONFIGS / "transfusion_embedded.yaml"),
            "--model.init_args.tokenizer", tokenizer, "--model.init_args.autoencoder", autoencoder,
            "--model.init_args.preset", "debug", "--model.init_args.sampling.num_steps", "2",
            "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]


EMAS = [f"--trainer.callbacks+={json.dumps({'class_path': 'transfusion.lightning.ema.EMA', 'init_args': a})}"
        for a in ({"decay": 0.9}, {"decay": 0.5, "every_n_steps": 2, "name": "fast"})]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tokenizer_path, autoencoder_ckpt):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ema_run")
    evaluation = {"class_path": "transfusion.lightning.evaluation.Evaluation",
                  "init_args": {"metrics": ["ppl"], "max_text_windows": 2, "every_n_train_steps": 2, "on_test": False,
                                "output_dir": str(root / "evaluation")}}
    cli = cli_main(["fit", *_args(root, tokenizer_path, autoencoder_ckpt), *EMAS,
                    f"--trainer.callbacks+={json.dumps(evaluation)}"])
    ckpt_path = cli.trainer.checkpoint_callback.last_model_path
    return SimpleNamespace(cli=cli, root=root, ckpt_path=ckpt_path, args=_args(root, tokenizer_path, autoencoder_ckpt),
                           ckpt=torch.load(ckpt_path, map_location="cpu", weights_only=True))


def test_checkpoint_holds_the_raw_weights_and_every_ema(ema_run):
    ckpt, cli = ema_run.ckpt, ema_run.cli
    first, fast = [c for c in cli.trainer.callbacks if isinstance(c, EMA)]
    assert list(ckpt["ema"]) == ["ema_0.9", "fast"] and ckpt["global_step"] == 4
    states = {v["name"]: v for k, v in ckpt["callbacks"].items() if k.startswith("EMA")}
    assert (states["ema_0.9"]["updates"], states["fast"]["updates"]) == (4, 2)  # every step / every 2nd step
    averaged, raw = first.averaged_and_raw(cli.model)
    assert first.swapped and cli.model.weights_source == "ema_0.9"  # after fit the module holds the first EMA
    assert _same(_network(cli.model), {**{k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")},
                                       **ckpt["ema"]["ema_0.9"]})
    assert _same(raw, {k: ckpt["state_dict"][k] for k in raw})  # state_dict: the raw weights, not the average
    assert _same(averaged, ckpt["ema"]["ema_0.9"]) and _same(fast.weights, ckpt["ema"]["fast"])
    assert not any(torch.equal(raw[k].cpu(), averaged[k].cpu()) for k in ("model.embedding.weight",))
    # evaluations during fit ran on the EMA weights
    evaluation = next(c for c in cli.trainer.callbacks if hasattr(c, "history"))
    assert [h["weights"] for h in evaluation.history] == ["ema_0.9", "ema_0.9"]


@pytest.mark.slow
def test_loading_outside_fit_takes_the_ema_and_raw_stays_reachable(ema_run):
    from transfusion.lightning.transfusion import TransfusionModule

    ckpt = ema_run.ckpt
    raw = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    for weights, expected in (("ema", ckpt["ema"]["ema_0.9"]), ("raw", {}), ("fast", ckpt["ema"]["fast"])):
        module = TransfusionModule.load_from_checkpoint(ema_run.ckpt_path, map_location="cpu", eval_weights=weights)
        assert _same(_network(module), {**raw, **expected}), weights
    assert module.weights_source == "fast"
    with pytest.raises(ValueError, match="eval_weights='slow'"):
        TransfusionModule.load_from_checkpoint(ema_run.ckpt_path, map_location="cpu", eval_weights="slow")

    # test and predict through the CLI
    ema = {**raw, **ckpt["ema"]["ema_0.9"]}
    tested = cli_main(["test", *ema_run.args, "--trainer.limit_test_batches", "1", "--ckpt_path", ema_run.ckpt_path])
    assert _same(_network(tested.model), ema) and tested.model.weights_source == "ema_0.9"
    out = ema_run.root / "samples"
    predicted = cli_main(["predict", *ema_run.args, "--config", str(CONFIGS / "transfusion_embedded_predict.yaml"),
                          "--trainer.callbacks.init_args.output_dir", str(out),
                          "--data.init_args.predict_examples", "1", "--ckpt_path", ema_run.ckpt_path])
    assert _same(_network(predicted.model), ema) and (out / "generations.jsonl").is_file()
    raw_test = cli_main(["test", *ema_run.args, "--trainer.limit_test_batches", "1", "--ckpt_path", ema_run.ckpt_path,
                         "--model.init_args.eval_weights", "raw"])
    assert _same(_network(raw_test.model), raw)


def test_export_and_save_pretrained_write_the_ema(ema_run, tmp_path):
    from transfusion.export import export_main
    from transfusion.lightning.transfusion import TransfusionModule

    ckpt = ema_run.ckpt
    for flags, expected, name in (([], ckpt["ema"]["ema_0.9"], "ema_0.9"), (["--weights", "raw"], ckpt["state_dict"], "raw"),
                                  (["--weights", "fast"], ckpt["ema"]["fast"], "fast")):
        folder = tmp_path / name
        export_main(["--ckpt_path", ema_run.ckpt_path, "--output", str(folder), *flags])
        saved = load_file(folder / "model.safetensors")
        assert _same({k: saved[k] for k in expected if k.startswith("model.")},
                     {k: v for k, v in expected.items() if k.startswith("model.")}), name
        assert json.loads((folder / "config.json").read_text())["weights"] == name
    ema_run.cli.model.save_pretrained(tmp_path / "after_fit")  # the module fit left: the first EMA's weights
    saved = load_file(tmp_path / "after_fit" / "model.safetensors")
    assert _same({k: saved[k] for k in ckpt["ema"]["ema_0.9"]}, ckpt["ema"]["ema_0.9"])
    loaded = TransfusionModule.from_pretrained(tmp_path / "after_fit")
    assert loaded.weights_source == "ema_0.9"
    assert _same({k: v for k, v in _network(loaded).items() if k in ckpt["ema"]["ema_0.9"]}, ckpt["ema"]["ema_0.9"])
    with pytest.raises(SystemExit):  # a checkpoint without EMA has no raw/named choice to make
        export_main(["--ckpt_path", str(_without_ema(ema_run.ckpt_path, tmp_path)), "--output", str(tmp_path / "x"),
                     "--weights", "raw"])


def _without_ema(path: str, tmp_path: Path) -> Path:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint.pop("ema")
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    return tmp_path / "plain.ckpt"


def test_chameleon_keeps_and_loads_an_ema(tmp_path, tokenizer_path, vq_ckpt):
    from transfusion.lightning.chameleon import ChameleonModule

    torch.set_num_threads(1)
    cli = cli_main(["fit", "--config", str(CONFIGS / "chameleon_embedded.yaml"),
                    "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", vq_ckpt,
                    "--model.init_args.preset", "debug", "--data.init_args.seq_len", "48",
                    "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", "--trainer.max_steps", "3",
                    "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                    EMAS[0]])
    ckpt = torch.load(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)
    raw = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    module = ChameleonModule.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu")
    assert _same(_network(module), {**raw, **ckpt["ema"]["ema_0.9"]}) and not _same(_network(module), raw)
    assert _same(_network(cli.model), _network(module))


def test_sweep_runs_keep_an_ema_before_their_evaluation(capsys):
    import yaml

    from transfusion.sweep import parse_sweep

    sweep, _ = parse_sweep(["--config", str(CONFIGS / "sweep_micro.yaml"), "--ema", '{"decay": 0.999}'])
    prepared = {"tokenizer": "tokenizer.model", "autoencoder": "ae.ckpt", "vqvae": "vq.ckpt", "clip": "clip"}
    with pytest.raises(SystemExit):
        cli_main(sweep.fit_args(sweep.runs[0], prepared) + ["--print_config"])
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert [c["class_path"].rpartition(".")[2] for c in callbacks[-2:]] == ["EMA", "Evaluation"]
    assert callbacks[-2]["init_args"]["decay"] == 0.999


# ----------------------------------------------------------------------------------------------------------
# exact resume after SIGKILL, with two EMAs

@pytest.mark.slow
@pytest.mark.distributed  # two runs side by side, a data worker each
def test_sigkill_then_resume_gives_the_same_raw_and_ema_weights(sigkill_resumed):
    """The shared run of conftest.py (its losses: test_reliability.py): killed with SIGKILL after the validation of
    step 4 (EMAs swapped in and out), resumed to the same raw and EMA weights bit for bit."""
    run = sigkill_resumed
    assert run.killed_returncode == -signal.SIGKILL
    assert 3 <= run.saved_step < run.steps
    assert run.resumed.returncode == 0, run.resumed.stderr[-3000:]
    a, b = (torch.load(root / "logs" / version / "checkpoints" / "last.ckpt", weights_only=True)
            for root, version in ((run.straight, "version_0"), (run.root, "version_1")))  # the resumed
    assert a["global_step"] == b["global_step"] == run.steps
    assert _same(a["state_dict"], b["state_dict"])  # raw weights, bit for bit
    assert list(a["ema"]) == list(b["ema"]) == ["ema_0.9", "fast"]
    for name in a["ema"]:
        assert _same(a["ema"][name], b["ema"][name]), name
    assert {k: v for k, v in a["callbacks"].items() if k.startswith("EMA")} == \
           {k: v for k, v in b["callbacks"].items() if k.startswith("EMA")}
