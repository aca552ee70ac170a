"""One sampling object (``SamplingOptions``): the module holds one, set as one argument group; the flat arguments of
earlier versions (YAML, command line, checkpoint hyper-parameters) map into it with a warning and sample the same;
``generate_*`` take one; with ``--ckpt_path`` the CLI keeps the checkpoint's model and the config's sampling."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch

from transfusion.cli import TransfusionCLI, cli_main
from transfusion.generation import ChameleonSamplingOptions, SamplingOptions
from transfusion.lightning.chameleon import ChameleonModule
from transfusion.lightning.transfusion import TransfusionModule

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FLAT = {"cfg_scale": 3.0, "num_steps": 2, "max_new_tokens": 3, "clip_x0": None}


@pytest.fixture(scope="module")
def modules(make_debug_transfusion):
    with pytest.warns(FutureWarning, match=r"flat sampling arguments .*--model.init_args.sampling"):
        old = make_debug_transfusion(redraw_lm_head=True, **FLAT)
    return old, make_debug_transfusion(redraw_lm_head=True, sampling=SamplingOptions(**FLAT))


def test_flat_arguments_sample_as_the_group(modules):
    old, new = modules
    assert old.sampling == new.sampling == SamplingOptions(**FLAT)
    assert old.hparams["sampling"] == new.hparams["sampling"] == asdict(SamplingOptions(**FLAT))
    assert not set(FLAT) & set(old.hparams)  # checkpoints hold the group only
    captions, seeds = ["a small red circle", "a big blue square"], [5, 6]
    images = old.generate_images(captions, seeds)
    assert torch.equal(images, new.generate_images(captions, seeds))
    assert old.generate_captions(images, seeds) == new.generate_captions(images, seeds)


def test_generate_takes_options_and_keeps_the_modules(modules):
    _, module = modules
    images = module.generate_images(["a red circle"], [0])
    assert module.generate_captions(images, [0], replace(module.sampling, max_new_tokens=0)) == [""]
    assert module.generate_captions(images, [0]) != [""]  # the module's own 3 tokens: no hidden default of 32
    other = module.generate_images(["a red circle"], [0], replace(module.sampling, num_steps=1))
    assert not torch.equal(images, other) and module.sampling.num_steps == 2


def test_unknown_sampling_option_is_named(tokenizer_path, autoencoder_ckpt):
    with pytest.raises(ValueError, match=r"TransfusionModule: unknown sampling option\(s\) \['steps'\]"):
        TransfusionModule(tokenizer_path, autoencoder_ckpt, sampling={"steps": 3})


def test_chameleon_flat_arguments_map_into_its_group():
    with pytest.warns(FutureWarning, match="image_temperature"):
        with pytest.raises(FileNotFoundError):  # the options are read before the files
            ChameleonModule("missing.model", "missing.ckpt", cfg_scale=2.0, image_temperature=0.5)
    from transfusion.generation.options import sampling_options
    with pytest.warns(FutureWarning):
        options = sampling_options(ChameleonSamplingOptions, None, {"cfg_scale": 2.0, "image_top_p": 0.9}, "m")
    assert options == ChameleonSamplingOptions(cfg_scale=2.0, image_top_p=0.9)


def _checkpoint(module, path, hparams: dict) -> str:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": "2.6.6", "global_step": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tokenizer_path, autoencoder_ckpt, tmp_path_factory):
    """The same weights saved by the previous version (flat keys, as LightningCLI writes them) and by this one."""
    module = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug", diffusion_lambda=4.0,
                               sampling=SamplingOptions(**FLAT))
    module.model  # built on first use
    root, hparams = tmp_path_factory.mktemp("sampling_ckpts"), {k: v for k, v in module.hparams.items()}
    hparams["_class_path"] = "transfusion.lightning.transfusion.TransfusionModule"
    flat = {**{k: v for k, v in hparams.items() if k != "sampling"}, **FLAT}
    return _checkpoint(module, root / "old.ckpt", flat), _checkpoint(module, root / "new.ckpt", hparams)


def test_checkpoints_of_both_forms_load(checkpoints):
    old, new = checkpoints
    with pytest.warns(FutureWarning):
        from_old = TransfusionModule.load_from_checkpoint(old, map_location="cpu")
    from_new = TransfusionModule.load_from_checkpoint(new, map_location="cpu")
    assert from_old.sampling == from_new.sampling == SamplingOptions(**FLAT)  # clip_x0 None kept, not the default
    assert from_new.hparams["sampling"] == asdict(SamplingOptions(**FLAT))


@pytest.mark.parametrize("form", ["old", "new"])
def test_cli_keeps_the_checkpoints_model_and_the_configs_sampling(checkpoints, tokenizer_path, autoencoder_ckpt,
                                                                  form, monkeypatch):
    monkeypatch.setattr(TransfusionCLI, "_run_subcommand", lambda self, subcommand: None)  # parse and build only
    ckpt = checkpoints[form == "new"]
    cli = cli_main(["validate", "--config", "lightning_configs/transfusion_embedded.yaml",
                    "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", autoencoder_ckpt,
                    "--model.init_args.sampling.num_steps", "7", "--data.init_args.num_workers", "0",
                    "--ckpt_path", ckpt])
    assert cli.model.hparams.diffusion_lambda == 4.0  # the checkpoint's model
    assert cli.model.sampling == SamplingOptions(cfg_scale=5.0, num_steps=7)  # the config's sampling, all of it


def test_evaluation_passes_its_options_and_leaves_the_modules(modules):
    from transfusion.lightning.evaluation import Evaluation

    _, module = modules
    assert Evaluation(metrics=["ppl"], sampling={"num_steps": 1}).options(module) == replace(module.sampling,
                                                                                          num_steps=1)
    assert module.sampling.num_steps == 2
    with pytest.raises(ValueError, match=r"Evaluation\(sampling=\{'steps': 1\}\).*valid: .*'num_steps'"):
        Evaluation(metrics=["ppl"], sampling={"steps": 1}).options(module)


def test_a_save_pretrained_folder_with_flat_settings_loads(checkpoints, tmp_path):
    """A folder written before the group (config.json's init_args with flat keys) loads with its settings."""
    import json

    module = TransfusionModule.load_from_checkpoint(checkpoints[1], map_location="cpu")
    module.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["init_args"] = {**{k: v for k, v in config["init_args"].items() if k != "sampling"}, **FLAT}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(FutureWarning, match="flat sampling arguments"):
        loaded = TransfusionModule.from_pretrained(tmp_path, map_location="cpu")
    assert loaded.sampling == SamplingOptions(**FLAT)
