"""Image editing (paper section 4.4): the embedded edits, the edit rows (a clean source image, InstructPix2Pix
dropout), the loss that leaves the source out, guidance by image and instruction, edit accuracy read from
pixels, and fine-tuning from a checkpoint through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from transfusion.cli import cli_main
from transfusion.data.embedded.shape_edits import EDITS, ShapeEdits, edit_combinations, is_held_out
from transfusion.data.embedded.shapes import all_attributes
from transfusion.data.rows.edits import CLEAN, EditRows
from transfusion.data.rows.sequences import SequenceLayout, collate_rows
from transfusion.data.tokenizer import Tokenizer
from transfusion.evaluation.edit import EditScore
from transfusion.generation import IMAGE, SamplingOptions, TransfusionGenerator

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ---------------------------------------------------------------- the embedded edits

def test_an_edit_changes_exactly_the_attribute_it_names():
    data = ShapeEdits(200, 32, seed=0)
    for i in range(len(data)):
        item = data[i]
        attribute, value = item["edit"]
        source, target = item["source_attributes"], item["target_attributes"]
        assert getattr(target, attribute) == value != getattr(source, attribute)
        assert all(getattr(source, a) == getattr(target, a) for a in EDITS if a != attribute)
        assert all(value in text for text in item["instructions"])
        assert item["source"].shape == item["target"].shape == (3, 32, 32)
    assert torch.equal(ShapeEdits(5, 32, seed=0)[3]["target"], data[3]["target"])  # a pure function of (seed, index)


def test_held_out_combinations_never_reach_training():
    combos = edit_combinations()
    assert len(combos) == len(all_attributes()) * sum(len(v) - 1 for v in EDITS.values())
    held_out = {c for c in combos if is_held_out(*c)}
    assert 0.08 < len(held_out) / len(combos) < 0.18  # about one in HELD_OUT
    for split, inside in (("train", False), ("heldout", True)):
        data = ShapeEdits(300, 16, seed=1, split=split)
        seen = {(data[i]["source_attributes"], *data[i]["edit"]) for i in range(len(data))}
        assert all((combo in held_out) == inside for combo in seen)
    assert {a for (_, a, _) in held_out} == set(EDITS)  # every kind of edit is evaluated


# ---------------------------------------------------------------- rows

@pytest.fixture(scope="module")
def layout(tokenizer_path):
    return SequenceLayout(Tokenizer(tokenizer_path), patches_per_image=4, image_size=16)


def _documents(row: dict, tok) -> list[tuple[list[int], list[int]]]:
    """(token ids with -1 at image positions, max_t of its images) per document of a row."""
    tokens = torch.where(row["image_ids"] >= 0, -1, row["tokens"])
    docs, image = [], 0
    for d in row["doc_ids"].unique().tolist():
        ids = tokens[row["doc_ids"] == d].tolist()
        if d == len(tokens):  # padding
            continue
        n_images = ids.count(tok.boi_id) if -1 in ids else 0
        docs.append((ids, row["max_t"][image:image + n_images].tolist()))
        image += n_images
    return docs


@pytest.mark.slow
def test_edit_documents_and_their_dropout(layout):
    tok, n = layout.tokenizer, layout.patches_per_image
    rows = EditRows(ShapeEdits(50, 16), layout, seq_len=96, num_rows=400, p_drop_instruction=0.1,
                    p_drop_source=0.1, p_drop_both=0.1, seed=3)
    image = [tok.boi_id] + [-1] * n + [tok.eoi_id]
    counts = {"full": 0, "no instruction": 0, "no source": 0, "neither": 0}
    for i in range(len(rows)):
        for ids, max_t in _documents(rows[i], tok):
            assert ids[0] == tok.bos_id
            if ids[1:1 + len(image)] == image and max_t[0] == CLEAN:  # the source comes first, clean
                rest = ids[1 + len(image):]
                if rest == image:
                    counts["no instruction"] += 1  # ends at EOI, like a dropped caption
                else:
                    assert rest[-len(image) - 1:] == image + [tok.eos_id] and all(t >= 0 for t in rest[:-len(image) - 1])
                    counts["full"] += 1
                assert max_t == [CLEAN, 0]
            elif ids[1:] == image:
                counts["neither"] += 1
                assert max_t == [0]
            else:
                assert ids[-len(image) - 1:] == image + [tok.eos_id] and max_t == [0]
                counts["no source"] += 1
    total = sum(counts.values())
    for key in ("no instruction", "no source", "neither"):  # 0.1 each, binomial sd ~ 0.3 / sqrt(total)
        assert abs(counts[key] / total - 0.1) < 4.5 * (0.09 / total) ** 0.5, counts
    batch = collate_rows([rows[i] for i in range(4)])
    assert batch["images"].shape[0] == batch["max_t"].shape[0] == int((batch["image_ids"] >= 0).sum()) // n


def _lm_pairs(row: dict, tok) -> list[tuple[int, int]]:
    """(input, target) token pairs of a row that the LM loss trains (``Transfusion.loss``'s rule)."""
    tokens, doc, is_text = row["tokens"], row["doc_ids"], row["image_ids"] < 0
    text_loss = row.get("text_loss", torch.ones_like(tokens, dtype=torch.bool))
    keep = (is_text[:-1] & is_text[1:] & (doc[:-1] == doc[1:]) & (tokens[:-1] != tok.boi_id)
            & (tokens[1:] != tok.pad_id) & text_loss[1:])
    return list(zip(tokens[:-1][keep].tolist(), tokens[1:][keep].tolist()))


@pytest.mark.parametrize("instruction_first", [False, True])
def test_edit_rows_teach_ending_after_the_edited_image_never_eoi_boi(layout, instruction_first):
    tok, n = layout.tokenizer, layout.patches_per_image
    rows = EditRows(ShapeEdits(50, 16), layout, seq_len=96, num_rows=200, p_drop_instruction=0.1, p_drop_source=0.1,
                    p_drop_both=0.1, instruction_first=instruction_first, p_clean_target=0.3, seed=7)
    image = [tok.boi_id] + [-1] * n + [tok.eoi_id]
    clean_targets, targets, ends = 0, 0, 0
    for i in range(len(rows)):
        row = rows[i]
        pairs = _lm_pairs(row, tok)
        assert (tok.eoi_id, tok.boi_id) not in pairs  # the BOI after a source is the prompt's, never learnt
        assert pairs.count((tok.eoi_id, tok.eos_id)) == int((row["tokens"] == tok.eos_id).sum())  # each end learnt
        ends += pairs.count((tok.eoi_id, tok.eos_id))
        for ids, max_t in _documents(row, tok):
            if any(t >= 0 and t not in (tok.bos_id, tok.boi_id, tok.eoi_id) for t in ids):  # an instruction
                assert ids[-len(image) - 1:] == image + [tok.eos_id]  # EOS right after the target's EOI
            assert max_t[-1] in (0, CLEAN) and all(m == CLEAN for m in max_t[:-1])  # a kept source: clean, first
            clean_targets += max_t[-1] == CLEAN
            targets += 1
        assert row["images"].shape[0] == len(row["max_t"])
    assert ends > 0.7 * targets  # all but the documents without an instruction (20%) end with EOS
    assert abs(clean_targets / targets - 0.3) < 4.5 * (0.21 / targets) ** 0.5  # p_clean_target
    with pytest.raises(ValueError, match="p_clean_target"):
        EditRows(ShapeEdits(5, 16), layout, p_clean_target=1.0)


def test_clean_targets_keep_their_end_and_before_the_fix_eoi_boi_was_learnt(layout):
    tok = layout.tokenizer
    kwargs = dict(seq_len=96, num_rows=30, p_drop_instruction=0.0, p_drop_source=0.0, p_drop_both=0.0,
                  instruction_first=True, seed=2)
    clean = EditRows(ShapeEdits(20, 16), layout, p_clean_target=0.999, **kwargs)
    for i in range(len(clean)):
        row = clean[i]
        assert (row["max_t"] == CLEAN).all()  # source and target enter clean: no diffusion loss in this row
        assert _lm_pairs(row, tok).count((tok.eoi_id, tok.eos_id)) == int((row["tokens"] == tok.eos_id).sum()) > 0
    before = EditRows(ShapeEdits(20, 16), layout, prompted_boi_loss=True, **kwargs)
    row = before[0]
    assert (tok.eoi_id, tok.boi_id) in _lm_pairs(row, tok) and row["text_loss"][row["image_ids"] < 0].all()
    after = EditRows(ShapeEdits(20, 16), layout, **kwargs)[0]
    assert torch.equal(after["tokens"], row["tokens"]) and torch.equal(after["max_t"], row["max_t"])
    off = ~after["text_loss"] & (after["image_ids"] < 0)
    assert int(off.sum()) == int((row["tokens"] == tok.eos_id).sum())  # one BOI per document


def test_edit_data_module_mixes_caption_rows_as_the_quickstart_trains(layout):
    from transfusion.data.modules.edit import EditDataModule

    tok = layout.tokenizer
    data = EditDataModule(seq_len=96, rows_per_epoch=200, num_edits=50, caption_ratio=0.5, image_first_max_t=100,
                          p_clean_target=0.1, instruction_first=True, layout=layout)
    data.setup("fit")
    kinds = {"caption first": 0, "image first": 0, "edit": 0}
    for i in range(60):
        row = data.train_set[i]
        for ids, max_t in _documents(row, tok):
            if ids.count(tok.boi_id) == 2:
                kinds["edit"] += 1
            elif ids[1] == tok.boi_id and ids[-1] == tok.eos_id and ids[-2] != tok.eoi_id:  # BOI <im> EOI text EOS
                kinds["image first"] += 1
                assert max_t == [100]  # read from a nearly clean picture, as the quickstart trains captions
            elif ids[-2:] == [tok.eoi_id, tok.eos_id]:
                kinds["caption first"] += 1
    assert all(kinds.values()), kinds
    with pytest.raises(ValueError, match="p_clean_target"):
        EditDataModule(p_clean_target=-0.1)


# ---------------------------------------------------------------- the model: the source enters clean

@pytest.fixture(scope="module")
def module(make_debug_transfusion):
    return make_debug_transfusion(min_snr_gamma=5.0)


def _edit_batch(module):
    layout = module.sequence_layout()
    rows = EditRows(ShapeEdits(8, layout.image_size), layout, seq_len=96, num_rows=4, p_drop_instruction=0,
                    p_drop_source=0, p_drop_both=0)
    batch = collate_rows([rows[i] for i in range(2)])
    batch["images"] = batch["images"].double()
    return batch


def test_the_source_image_is_context_not_a_denoising_target(module):
    batch = _edit_batch(module)
    clean = batch["max_t"] == CLEAN
    assert clean.any() and (~clean).any()
    latents = module.encode_images(batch["images"])
    max_t, schedule = batch["max_t"], module.model.schedule
    assert (schedule.limits(max_t)[clean] == 0).all() and (schedule.limits(max_t)[~clean] == 1000).all()
    generators = module.image_generators({**batch, "row_index": torch.arange(2)}, step=0)
    t, noise = schedule.draw_times(len(max_t), max_t, generators), schedule.draw_noise(latents, generators)
    assert (t[clean] == 0).all() and (t[~clean] > 0).all()
    args = (batch["tokens"], batch["doc_ids"], batch["image_ids"], latents, max_t)
    kw = dict(pad_id=module.tokenizer.pad_id, boi_id=module.tokenizer.boi_id, t=t)
    out = module.model.loss(*args, noise=noise, **kw)
    assert int(out["images"]) == int((~clean).sum()) and len(out["ddpm_per_image"]) == int((~clean).sum())
    other_noise = torch.where(clean[:, None, None, None], torch.randn_like(noise), noise)
    assert out["loss"] == module.model.loss(*args, noise=other_noise, **kw)["loss"]  # t = 0: its noise is unused
    # ... yet the targets see it: another source picture changes the targets' predicted noise
    other_latents = torch.where(clean[:, None, None, None], latents.flip(0), latents)
    assert out["ddpm_loss"] != module.model.loss(*args[:3], other_latents, max_t, noise=noise, **kw)["ddpm_loss"]
    drawn = module.model.loss(*args, **{k: v for k, v in kw.items() if k != "t"})  # timesteps drawn in the loss
    assert (drawn["t"] > 0).all() and len(drawn["t"]) == int((~clean).sum())


# ---------------------------------------------------------------- guidance by image and instruction

def _generator(module, **options):
    return TransfusionGenerator(module.model, module.autoencoder.model, module.tokenizer,
                                SamplingOptions(**{"max_new_tokens": 0, "num_steps": 3, **options}))


def _probe(generator, prompts, monkeypatch, times=(900, 300, 10)) -> list[torch.Tensor]:
    """The guided prediction (noise; velocity for flow, ``times`` floats s T) at fixed points (x, t) for each of the
    prompts' images, and the final latents."""
    schedule, probes = generator.model.schedule, []
    sample = type(schedule).sample

    def probing(eps_fn, shape, *args, **kwargs):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        probes.extend(eps_fn(x, torch.full((shape[0],), t)) for t in times)  # int: long; float: float32
        return sample(schedule, eps_fn, shape, *args, **kwargs)

    monkeypatch.setattr(schedule, "sample", probing)
    latents = generator.generate(prompts, seeds=[1] * len(prompts), decode=False)
    monkeypatch.undo()
    return probes + [torch.stack([out[0] for out in latents])]


def test_editing_guidance_combines_three_predictions(module, monkeypatch):
    source = ShapeEdits(1, 16)[0]["source"].double()
    edit, image_only, nothing = [source, "make it red", IMAGE], [source, IMAGE], ["", IMAGE]
    eps_c = _probe(_generator(module, cfg_scale=1.0), [edit], monkeypatch)
    eps_i = _probe(_generator(module, cfg_scale=1.0), [image_only], monkeypatch)
    eps_u = _probe(_generator(module, cfg_scale=1.0), [nothing], monkeypatch)
    for c, i, u in zip(eps_c[:3], eps_i[:3], eps_u[:3]):  # the three conditions differ
        assert (c - i).abs().max() > 1e-4 * c.abs().max() and (i - u).abs().max() > 1e-4 * i.abs().max()
    for s_t, s_i in ((3.0, 1.5), (1.0, 0.0), (0.0, 2.0)):
        guided = _probe(_generator(module, cfg_scale=s_t, image_cfg_scale=s_i), [edit], monkeypatch)
        for g, c, i, u in zip(guided[:3], eps_c[:3], eps_i[:3], eps_u[:3]):
            expected = u + s_i * (i - u) + s_t * (c - i)
            assert (g - expected).abs().max() <= 1e-9 * expected.abs().max()
    # s_I = s_T = 1 is the conditional chain itself, latents and all
    same = _probe(_generator(module, cfg_scale=1.0, image_cfg_scale=1.0), [edit], monkeypatch)
    assert (same[-1] - eps_c[-1]).abs().max() <= 1e-9 * eps_c[-1].abs().max()


def test_editing_guidance_cache_batch_and_text_after_the_image(module):
    data = ShapeEdits(3, 16)
    prompts = [[data[0]["source"].double(), "make it red", IMAGE], [data[1]["source"].double(), "move it", IMAGE],
               ["a small blue square", IMAGE], [data[2]["source"].double()]]
    options = dict(cfg_scale=3.0, image_cfg_scale=1.5, max_new_tokens=4)
    cached = _generator(module, **options).generate(prompts, seeds=[0, 1, 2, 3], decode=False)
    recomputed = _generator(module, use_cache=False, **options).generate(prompts, seeds=[0, 1, 2, 3], decode=False)
    alone = [_generator(module, **options).generate([p], seeds=[i], decode=False)[0] for i, p in enumerate(prompts)]
    for a, b, c in zip(cached, recomputed, alone):
        assert [type(s) for s in a] == [type(s) for s in b] == [type(s) for s in c]
        for x, y, z in zip(a, b, c):
            if isinstance(x, str):
                assert x == y == z
            else:
                for other in (y, z):
                    assert (x - other).abs().max() <= 1e-9 * x.abs().max()
    with pytest.raises(ValueError, match="image_cfg_scale"):
        SamplingOptions(image_cfg_scale=-1.0)


# ---------------------------------------------------------------- edit accuracy from pixels

def test_edit_score_reads_what_changed():
    data = ShapeEdits(48, 32, seed=2, split="heldout")
    items = [data[i] for i in range(len(data))]
    sources, edits = [it["source_attributes"] for it in items], [it["edit"] for it in items]
    right = EditScore()
    right.update(torch.stack([it["target"] for it in items]), sources, edits)
    assert right.compute()["all"] == 1.0
    unchanged = EditScore()  # the source handed back: nothing asked was done, everything else kept
    unchanged.update(torch.stack([it["source"] for it in items]), sources, edits)
    rates = unchanged.compute()
    assert rates["asked"] == 0.0 and rates["kept"] == 1.0 and rates["all"] == 0.0
    with pytest.raises(ValueError, match="pictures"):
        right.update(torch.stack([items[0]["target"]]), sources, edits)


def test_edit_and_follow_scores_fail_a_prompt_that_does_not_end_after_one_image():
    from transfusion.lightning.evaluation import Evaluation, edit_metrics, follow_metrics

    data = ShapeEdits(6, 32, seed=2, split="heldout")
    items = [data[i] for i in range(len(data))]
    target = [it["target"] for it in items]
    # fake generator outputs: exactly one image, a second image (EOI -> BOI), text after it, no image at all
    outputs = [[target[0]], [target[1], target[1]], [target[2], " a"], [], [target[4]], [target[5]]]

    class Generator:
        def generate(self, prompts, seeds=None):
            return [outputs[s] for s in seeds]

    class Module:
        hparams = {"generation_seed": 0}

        def generator(self, sampling=None, **overrides):
            assert overrides == {"max_new_tokens": 1}  # one token after the image shows whether it ends
            return Generator()

    class Data:
        def edit_examples(self, num):
            return [{**it, "instruction": it["instructions"][0]} for it in items[:num]]

        def edit_prompt(self, source, instruction):
            return [instruction, source, IMAGE]

    edits = Evaluation(metrics=["edit"], num_samples=6, batch_size=4)._edit(Module(), Data(), 0, 1, None)
    assert [e["single"] for e in edits] == [True, False, False, False, True, True]
    rates = edit_metrics(edits)
    assert rates["edit@shapes/one_image"] == 0.5 and rates["edit@shapes"] == 0.5  # the first picture is right in 5
    assert rates["edit@shapes/asked"] == 5 / 6  # asked / kept read the first picture: the empty output is blank
    score = EditScore()
    score.update(torch.stack(target), [it["source_attributes"] for it in items], [it["edit"] for it in items])
    assert score.compute()["one_image"] == 1.0 and score.compute()["all"] == 1.0  # without counts: as before
    with pytest.raises(ValueError, match="output counts"):
        score.update(torch.stack(target), [it["source_attributes"] for it in items], [it["edit"] for it in items],
                     [True])
    # caption -> image: the same rule
    captions = [it["target_attributes"].caption(0) for it in items]
    samples = [(c, t, c, c, one) for c, t, one in zip(captions, target, [True, False, True, True, False, True])]
    rates = follow_metrics(samples)
    assert rates["follow@shapes/one_image"] == 4 / 6 and rates["follow@shapes"] == 4 / 6
    assert follow_metrics([s[:4] for s in samples])["follow@shapes"] == 1.0


# ---------------------------------------------------------------- fine-tuning from a checkpoint, through the CLI

def _base_fit(root: Path, tokenizer: str, autoencoder: str) -> str:
    from test_cli import _fit_args

    cli = cli_main(["fit", *_fit_args(root, tokenizer, autoencoder, steps=2)])
    return cli.trainer.checkpoint_callback.last_model_path


def _edit_args(root: Path, tokenizer: str, autoencoder: str, init_from: str, steps: int) -> list[str]:
    return ["--config", str(CONFIGS / "edit_embedded.yaml"),
            "--model.init_args.tokenizer", tokenizer, "--model.init_args.autoencoder", autoencoder,
            "--model.init_args.init_from", init_from, "--model.init_args.preset", "debug",
            "--model.init_args.min_snr_gamma", "null", "--model.init_args.sampling.num_steps", "3",
            "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks.init_args.every_n_train_steps", str(steps),
            "--trainer.callbacks.init_args.num_samples", "4", "--trainer.callbacks.init_args.batch_size", "4",
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]


@pytest.mark.slow
def test_fine_tune_from_a_checkpoint_evaluates_edits_and_predicts_from_a_prompt_file(tmp_path, tokenizer_path,
                                                                                    autoencoder_ckpt):
    from PIL import Image

    from transfusion.images import to_pil
    from transfusion.lightning.transfusion import TransfusionModule

    base = _base_fit(tmp_path / "base", tokenizer_path, autoencoder_ckpt)
    started = cli_main(["fit", *_edit_args(tmp_path / "edit0", tokenizer_path, autoencoder_ckpt, base, steps=1),
                        "--model.init_args.lr", "1e-12", "--model.init_args.warmup_steps", "0"])
    trained = TransfusionModule.load_from_checkpoint(base, map_location="cpu")
    for name, value in trained.model.state_dict().items():  # lr ~ 0: still the base checkpoint's weights
        assert torch.allclose(started.model.model.state_dict()[name], value, atol=1e-9), name

    edit = cli_main(["fit", *_edit_args(tmp_path / "edit", tokenizer_path, autoencoder_ckpt, base, steps=3)])
    report = json.loads((Path(edit.trainer.logger.log_dir) / "evaluation.json").read_text())
    assert {"edit@shapes", "edit@shapes/asked", "edit@shapes/kept", "edit@shapes/one_object"} <= set(report["metrics"])
    assert report["sampler"]["image_cfg_scale"] == 3.0 and "follow@shapes" in report["metrics"]
    assert list(Path(edit.trainer.logger.log_dir).glob("evaluation/eval_step3/edits.png"))

    source = to_pil(ShapeEdits(1, 16)[0]["source"])
    source.save(tmp_path / "shape.png")
    (tmp_path / "edits.jsonl").write_text(json.dumps({"segments": [{"image": "shape.png"}, "make it red", "<image>"]}) + "\n")
    ckpt = edit.trainer.checkpoint_callback.last_model_path
    cli_main(["predict", "--config", str(CONFIGS / "edit_embedded.yaml"),
              "--config", str(CONFIGS / "transfusion_embedded_predict.yaml"), "--ckpt_path", ckpt,
              "--data.init_args.prompts", str(tmp_path / "edits.jsonl"),
              "--trainer.callbacks.init_args.output_dir", str(tmp_path / "samples"),
              "--trainer.default_root_dir", str(tmp_path / "predict")])
    record = json.loads((tmp_path / "samples" / "generations.jsonl").read_text())
    assert record["kind"] == "edit" and record["images"] == ["images/0000_0.png"]
    assert Image.open(tmp_path / "samples" / "edits.png").size[0] > 0


@pytest.mark.slow
def test_init_from_refuses_another_architecture(tmp_path, tokenizer_path, autoencoder_ckpt):
    base = _base_fit(tmp_path / "base", tokenizer_path, autoencoder_ckpt)
    with pytest.raises(ValueError, match="n_layers"):
        cli_main(["fit", *_edit_args(tmp_path / "edit", tokenizer_path, autoencoder_ckpt, base, steps=1),
                  "--model.init_args.transformer", "{n_layers: 3}"])


@pytest.mark.slow
def test_fine_tune_on_a_real_format_table(tmp_path, tokenizer_path, autoencoder_ckpt):
    """The InstructPix2Pix-style path: the parquet example `data/prepare_edits.py` makes, through `transfusion fit`."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "data" / "prepare_edits.py"), "--output", str(tmp_path / "edits"),
                    "--train", "16", "--validation", "8", "--image_size", "16"], check=True, timeout=300)
    base = _base_fit(tmp_path / "base", tokenizer_path, autoencoder_ckpt)
    source = json.dumps({"class_path": "transfusion.data.sources.EditFilesSource",
                         "init_args": {"data_files": str(tmp_path / "edits" / "parquet" / "train.parquet"),
                                       "val_data_files": str(tmp_path / "edits" / "parquet" / "validation.parquet")}})
    edit = cli_main(["fit", *_edit_args(tmp_path / "edit", tokenizer_path, autoencoder_ckpt, base, steps=2),
                     "--data.init_args.edits", source, "--trainer.callbacks.init_args.metrics", "[]"])
    assert edit.trainer.global_step == 2
    assert type(edit.datamodule.train_set.edits).__name__ == "EditTriples" and len(edit.datamodule.train_set.edits) == 16


def test_instruction_first_keeps_each_target_patch_at_a_fixed_distance_from_its_source_patch(layout):
    tok, n = layout.tokenizer, layout.patches_per_image
    rows = EditRows(ShapeEdits(50, 16), layout, seq_len=96, num_rows=20, p_drop_instruction=0, p_drop_source=0,
                    p_drop_both=0, instruction_first=True)
    for i in range(len(rows)):
        row = rows[i]
        for ids, max_t in _documents(row, tok):
            first_image = ids.index(tok.boi_id)
            assert all(t >= 0 for t in ids[1:first_image]) and first_image > 1  # BOS instruction BOI ...
            assert ids[first_image:] == [tok.boi_id] + [-1] * n + [tok.eoi_id] + [tok.boi_id] + [-1] * n + [tok.eoi_id, tok.eos_id]
            assert max_t == [CLEAN, 0]
