"""Interleaved documents (``transfusion.data.rows.documents``): the row rules, the masks they give, loss flags, packing;
pair and edit rows unchanged; the embedded stories; interleaved prompts; a tiny fit on stories through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from transfusion.cli import cli_main
from transfusion.data.embedded.shape_edits import ShapeEdits
from transfusion.data.embedded.shapes import ShapesDataset
from transfusion.data.embedded.stories import ShapeStories, story_key
from transfusion.data.rows.documents import CLEAN, DocumentRows, Picture, Text, document_tokens, record_document
from transfusion.data.rows.edits import EditRows
from transfusion.data.rows.sequences import SequenceLayout, TransfusionRows, collate_rows
from transfusion.data.tokenizer import Tokenizer
from transfusion.evaluation.follow import read_shapes
from transfusion.models.attention import dense_mask

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
N = 4  # patches per image in these tests
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def layout(tok):
    return SequenceLayout(tok, N, 16)


def _images(count: int) -> list[torch.Tensor]:
    return [torch.full((3, 16, 16), float(k) / 10) for k in range(count)]


# ---------------------------------------------------------------- the row rules

def test_a_record_becomes_bos_text_boi_patches_eoi_eos_with_its_loss_flags(tok):
    record = {"segments": [{"text": "a red circle"}, {"image": 0}, {"text": "then it turns blue", "loss": False},
                           {"image": 1, "loss": False}, {"text": "the end"}], "images": _images(2)}
    doc = record_document(record, tok, N, image_first_max_t=100)
    a, b, c = tok.encode("a red circle"), tok.encode("then it turns blue"), tok.encode("the end")
    image = [tok.boi_id] + [-1] * N + [tok.eoi_id]
    assert doc.tokens == [tok.bos_id] + a + image + b + image + c + [tok.eos_id]
    on, off = True, False
    assert doc.text_loss == ([on] + [on] * len(a) + [on] + [on] * N + [on] + [off] * len(b)
                             + [on] + [off] * N + [on] + [on] * len(c) + [on])  # BOI, EOI and EOS stay targets
    assert doc.max_t == [0, CLEAN]  # the loss-off image enters clean
    assert [x is y for x, y in zip(doc.images, record["images"])] == [True, True]


@pytest.mark.parametrize("segments, max_t, eos", [
    ([{"image": 0}, {"text": "a caption"}], [100], True),  # captioned: no text before, text after
    ([{"text": "a caption"}, {"image": 0}], [0], True),
    ([{"image": 0}], [0], False),  # no text at all: the unconditional branch ends at EOI
    ([{"image": 0}, {"image": 1}, {"text": "two"}], [100, 100], True),
    ([{"image": 0}, {"text": "one"}, {"image": 1}, {"text": "two"}], [100, 0], True),
    ([{"image": 0, "loss": False}, {"text": "edit"}, {"image": 1}], [CLEAN, 0], True),
])
def test_the_image_first_limit_applies_only_to_images_with_no_text_before_and_text_after(tok, segments, max_t, eos):
    doc = record_document({"segments": segments, "images": _images(2)}, tok, N, image_first_max_t=100)
    assert doc.max_t == max_t
    assert (doc.tokens[-1] == tok.eos_id) == eos
    assert record_document({"segments": segments, "images": _images(2)}, tok, N).max_t == [
        CLEAN if m == CLEAN else 0 for m in max_t]  # no limit set: the full schedule


def test_document_masks_text_causal_images_bidirectional_later_images_see_earlier_ones(tok, layout):
    story = {"segments": [{"text": "one"}, {"image": 0}, {"text": "two"}, {"image": 1}], "images": _images(2)}
    other = {"segments": [{"text": "other"}, {"image": 0}], "images": _images(1)}
    rows = DocumentRows([story, other], layout, seq_len=64)
    docs = [rows.document(0), rows.document(1)]
    from transfusion.data.rows.documents import pack

    row = pack(docs, 64, N, tok.pad_id)
    mask = dense_mask(row["doc_ids"][None], row["image_ids"][None])[0, 0]  # (L, L)
    img, doc = row["image_ids"], row["doc_ids"]
    first = [int((img == k).nonzero()[0]) for k in range(3)]
    last = [int((img == k).nonzero()[-1]) for k in range(3)]
    assert mask[first[0], last[0]] and mask[first[1], last[1]]  # bidirectional inside each image
    assert not mask[last[0], first[1]]  # an earlier image does not see a later one
    assert mask[first[1], :first[1]].all()  # image 2 sees all of its document before it: text and image 1
    text = [p for p in range(len(docs[0].tokens)) if img[p] < 0]
    assert mask[text[3], text[2]] and not mask[text[2], text[3]]  # text is causal
    assert not mask[doc == 0][:, doc == 1].any() and not mask[doc == 1][:, doc == 0].any()  # no attention across
    assert row["max_t"].tolist() == [0, 0, 0] and "text_loss" not in row  # every target on: no mask in the row


def test_packing_is_a_pure_function_of_seed_and_index_and_collates_with_pair_rows(tok, layout):
    records = [{"key": f"r{k}", "segments": [{"text": "hello"}, {"image": 0}, {"text": "bye", "loss": False}],
                "images": _images(1)} for k in range(5)]
    rows = DocumentRows(records, layout, seq_len=40, num_rows=8, seed=3)
    a, b = rows[5], DocumentRows(records, layout, seq_len=40, num_rows=8, seed=3)[5]
    assert all(torch.equal(a[k], b[k]) for k in ("tokens", "doc_ids", "image_ids", "images", "max_t", "text_loss"))
    doc_len = len(rows.document(0).tokens)
    assert int((a["doc_ids"] < 40).sum()) == (40 // doc_len) * doc_len  # as many documents as fit
    assert a["images"].shape[0] == 40 // doc_len == int((a["image_ids"] >= 0).sum()) // N
    assert int((~a["text_loss"]).sum()) == (40 // doc_len) * len(tok.encode("bye"))
    pairs = TransfusionRows(ShapesDataset(4, 16), None, layout, seq_len=40, text_ratio=0.0)
    batch = collate_rows([a, pairs[0]])
    assert batch["text_loss"][1].all() and torch.equal(batch["text_loss"][0], a["text_loss"])
    assert "text_loss" not in collate_rows([pairs[0], pairs[1]])  # pair batches are unchanged
    with pytest.raises(ValueError, match="'r0'.*raise seq_len"):
        DocumentRows(records[:1], layout, seq_len=8)[0]


@pytest.mark.parametrize("segments, match", [
    ([{"text": "a", "image": 0}], "segment 0"),
    ([{"image": 2}], "image index 2"),
    ([{"text": "a", "loss": "no"}], "boolean 'loss'"),
    ([], "non-empty list"),
])
def test_malformed_segments_are_refused_naming_the_record(tok, layout, segments, match):
    rows = DocumentRows([{"key": "bad-7", "segments": segments, "images": _images(1)}], layout, seq_len=64)
    with pytest.raises(ValueError, match=f"'bad-7'.*{match}"):
        rows[0]


def test_loss_flags_reach_the_lm_and_diffusion_losses(tok, layout, tokenizer_path, autoencoder_ckpt):
    from transfusion.lightning.transfusion import TransfusionModule

    module = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug")
    n = module.patches_per_image
    layout = SequenceLayout(tok, n, 16)
    record = {"segments": [{"text": "a red circle", "loss": False}, {"image": 0}, {"text": "then it turns blue"},
                           {"image": 1, "loss": False}], "images": ShapesDataset(2, 16).__getitem__(0)["image"][None].repeat(2, 1, 1, 1)}
    length = len(DocumentRows([record], layout).document(0).tokens)
    batch = collate_rows([DocumentRows([record], layout, seq_len=length, num_rows=1)[0]])  # one document
    latents = module.encode_images(batch["images"])
    max_t = batch["max_t"]
    assert max_t.tolist() == [0, CLEAN]  # the loss-off image enters clean (0: the full schedule)
    off = module.model.loss(batch["tokens"], batch["doc_ids"], batch["image_ids"], latents, max_t,
                            pad_id=tok.pad_id, boi_id=tok.boi_id, generator=torch.Generator().manual_seed(0),
                            text_loss=batch["text_loss"])
    on = module.model.loss(batch["tokens"], batch["doc_ids"], batch["image_ids"], latents, max_t,
                           pad_id=tok.pad_id, boi_id=tok.boi_id, generator=torch.Generator().manual_seed(0))
    assert int(on["text_tokens"]) - int(off["text_tokens"]) == len(tok.encode("a red circle"))
    assert int(off["images"]) == 1 and off["t"].numel() == 1  # one image denoised
    assert torch.equal(off["ddpm_loss"], on["ddpm_loss"]) and not torch.equal(off["lm_loss"], on["lm_loss"])


def test_chameleon_honours_the_loss_flags():
    from transfusion.models.chameleon import Chameleon, ChameleonConfig
    from transfusion.models.transformer import TransformerConfig

    torch.manual_seed(0)
    model = Chameleon(ChameleonConfig(TransformerConfig.from_name("debug"), text_vocab_size=32, codebook_size=8,
                                      patches_per_image=4))
    tokens = torch.randint(1, 40, (1, 12))
    doc_ids, image_ids = torch.zeros(1, 12, dtype=torch.long), torch.full((1, 12), -1)
    text_loss = torch.ones(1, 12, dtype=torch.bool)
    text_loss[0, 3:6] = False
    assert int(model.loss(tokens, doc_ids, image_ids, text_loss=text_loss)["text_tokens"]) == 11 - 3


# ---------------------------------------------------------------- pairs and edits: the same rows as before

def _legacy_pair_document(self, caption, image_first):
    """``TransfusionRows.document`` before documents.py (commit 0987e19), verbatim."""
    tok = self.tok
    image = [tok.boi_id] + [-1] * self.layout.patches_per_image + [tok.eoi_id]
    if image_first:
        return [tok.bos_id] + image + caption + [tok.eos_id]
    if not caption:
        return [tok.bos_id] + image
    return [tok.bos_id] + caption + image + [tok.eos_id]


def _legacy_edit_document(self, instruction, keep_source, keep_instruction):
    """``EditRows.document`` before documents.py (commit 0987e19), verbatim."""
    tok, image = self.tok, [self.tok.boi_id] + [-1] * self.layout.patches_per_image + [self.tok.eoi_id]
    source, instruction = (image if keep_source else []), (instruction if keep_instruction else [])
    doc = [tok.bos_id] + (instruction + source if self.instruction_first else source + instruction) + image
    return doc + [tok.eos_id] if keep_instruction else doc


def _legacy_edit_getitem(self, index):
    """``EditRows.__getitem__`` before the rows carried ``text_loss`` (commit 54bc61a), verbatim."""
    rng = np.random.default_rng([self.seed, index, 11])
    if self.mix is not None and rng.random() < self.mix_ratio:
        return {**self.mix[index % len(self.mix)], "index": index}
    L, n = self.seq_len, self.layout.patches_per_image
    tokens, doc_ids, images, max_t, docs = [], [], [], [], 0
    while True:
        edit = self.edits[int(rng.integers(len(self.edits)))]
        instruction = edit["instructions"][int(rng.integers(len(edit["instructions"])))]
        u = rng.random()
        keep_instruction = not (u < self.drops[0] or self.drops[1] <= u < self.drops[2])
        keep_source = not self.drops[0] <= u < self.drops[2]
        doc = self.document(self.tok.encode(instruction), keep_source, keep_instruction)
        if len(tokens) + len(doc) > L:
            break
        doc_ids += [docs] * len(doc)
        docs += 1
        tokens += doc
        if keep_source:
            images.append(edit["source"])
            max_t.append(CLEAN)
        images.append(edit["target"])
        max_t.append(0)
    tokens = torch.tensor(tokens + [self.tok.pad_id] * (L - len(tokens)))
    doc_ids = torch.tensor(doc_ids + [L] * (L - len(doc_ids)))
    is_image = tokens == -1
    image_ids = torch.full((L,), -1, dtype=torch.long)
    image_ids[is_image] = torch.arange(len(images)).repeat_interleave(n)
    tokens[is_image] = self.tok.pad_id
    return {"tokens": tokens, "doc_ids": doc_ids, "image_ids": image_ids, "images": torch.stack(images),
            "max_t": torch.tensor(max_t, dtype=torch.long), "index": index}


def _rows(dataset, count):
    return [dataset[i] for i in range(count)]


def _assert_same_rows(new, old):
    for a, b in zip(new, old):
        assert a.keys() == b.keys() and "text_loss" not in a
        for key in a:
            x, y = a[key], b[key]
            assert (torch.equal(x, y) and x.dtype == y.dtype) if isinstance(x, torch.Tensor) else x == y, key


def test_pair_and_edit_rows_are_bitwise_those_of_before(tok, layout, monkeypatch):
    text = torch.tensor([tok.bos_id] + tok.encode("some news text to read " * 20) + [tok.eos_id])
    pairs = TransfusionRows(ShapesDataset(50, 16), text, layout, seq_len=48, text_ratio=0.5, caption_dropout=0.3,
                            p_caption_first=0.6, image_first_max_t=200, seed=4)
    edits = [EditRows(ShapeEdits(50, 16), layout, seq_len=48, p_drop_instruction=0.2, p_drop_source=0.2,
                      p_drop_both=0.2, instruction_first=first, prompted_boi_loss=True, seed=5)  # the rows before
             for first in (False, True)]
    for caption in ([], tok.encode("a red circle")):
        for image_first in (False, True):
            assert pairs.document(caption, image_first) == _legacy_pair_document(pairs, caption, image_first)
    new = [_rows(pairs, 40)] + [_rows(e, 40) for e in edits]
    for row in (r for rows in new[1:] for r in rows):  # edit rows: only the source's patches are no code targets
        text_loss = row.pop("text_loss", torch.ones_like(row["tokens"], dtype=torch.bool))
        sources = torch.isin(row["image_ids"], (row["max_t"] == CLEAN).nonzero()[:, 0])
        assert torch.equal(~text_loss, sources)
    monkeypatch.setattr(TransfusionRows, "document", _legacy_pair_document)
    monkeypatch.setattr(EditRows, "document", _legacy_edit_document)
    monkeypatch.setattr(EditRows, "__getitem__", _legacy_edit_getitem)
    old = [_rows(pairs, 40)] + [_rows(e, 40) for e in edits]
    for a, b in zip(new, old):
        _assert_same_rows(a, b)
    assert {int(m) for row in new[1] for m in row["max_t"]} == {CLEAN, 0}  # both kinds of edit image were drawn


# ---------------------------------------------------------------- the embedded stories

def test_stories_are_pure_draw_what_they_say_and_hold_stories_out():
    stories = ShapeStories(40, 32, seed=0)
    a, b = stories[7], ShapeStories(40, 32, seed=0)[7]
    assert a["texts"] == b["texts"] and all(torch.equal(x, y) for x, y in zip(a["images"], b["images"]))
    assert {len(stories[i]["images"]) for i in range(40)} == {2, 3}
    for i in range(10):
        s = stories[i]
        assert [seg for seg in s["segments"] if "image" in seg] == [{"image": k} for k in range(len(s["images"]))]
        assert s["texts"][1].startswith("then it ")
        for picture, asked in zip(s["images"], s["attributes"]):
            reading = read_shapes(picture)
            assert (reading["colour"], reading["position"], reading["shape"]) == (asked.colour, asked.position,
                                                                                    asked.shape)
        for before, after in zip(s["attributes"], s["attributes"][1:]):  # one attribute changes a step
            assert sum(getattr(before, f) != getattr(after, f) for f in ("size", "colour", "shape", "position")) == 1

    def keys(data):
        return {story_key(*data.story(i)[:2]) for i in range(len(data))}

    assert not keys(ShapeStories(300, 32, seed=0)) & keys(ShapeStories(100, 32, seed=2, split="heldout"))


# ---------------------------------------------------------------- interleaved prompts

def test_an_interleaved_prompt_generates_each_image_after_its_text(tokenizer_path, autoencoder_ckpt):
    from transfusion.generation import IMAGE, SamplingOptions, TransfusionGenerator
    from transfusion.lightning.transfusion import TransfusionModule

    torch.manual_seed(0)
    module = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug")
    with torch.no_grad():  # the patch decoder starts at zero: images would not depend on their context
        proj = module.model.patch_decoder.proj.weight
        proj.copy_(0.2 * torch.randn(proj.shape, generator=torch.Generator().manual_seed(0)))
    module = module.double().eval()  # float64: cache, batch and recompute agree to ~1e-16

    def generate(prompts, **options):
        options = SamplingOptions(num_steps=3, max_new_tokens=0, **options)
        generator = TransfusionGenerator(module.model, module.autoencoder.model, module.tokenizer, options)
        return generator.generate(prompts, seeds=list(range(len(prompts))), decode=False)

    story = ["a small red circle in the centre", IMAGE, "then it turns blue", IMAGE, "then it moves to the top left",
             IMAGE]
    out = generate([story, ["a large square", IMAGE]])
    assert [isinstance(x, torch.Tensor) for x in out[0]] == [True] * 3 and len(out[1]) == 1  # text is not output
    alone = generate([story])[0]
    uncached = generate([story], use_cache=False)[0]
    for x, y, z in zip(out[0], alone, uncached):  # a batch and the cache change nothing
        assert float((x - y).abs().max() / x.abs().max()) < 1e-9 and float((x - z).abs().max() / x.abs().max()) < 1e-9
    first = generate([story[:2]])[0][0]
    assert float((first - out[0][0]).abs().max() / first.abs().max()) < 1e-9  # the first image sees only its text
    assert not torch.allclose(generate([story[:2] + ["then it turns green", IMAGE]])[0][1], out[0][1])
    with pytest.raises(ValueError, match="only text and IMAGE"):
        generate([["a", IMAGE, ShapesDataset(1, 16)[0]["image"].double(), IMAGE]])


# ---------------------------------------------------------------- through the CLI

@pytest.mark.slow
def test_fit_on_stories_through_the_cli_then_draw_a_three_picture_story(tmp_path, tokenizer_path, autoencoder_ckpt):
    from transfusion.evaluation.story import generate_stories, story_scores

    steps = 2
    cli = cli_main(["fit", "--config", str(CONFIGS / "story_embedded.yaml"),
                    "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", autoencoder_ckpt,
                    "--model.init_args.init_from", "null", "--model.init_args.preset", "debug",
                    "--model.init_args.sampling.num_steps", "3", "--model.init_args.warmup_steps", "1",
                    "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
                    "--data.init_args.images_per_story", "[3, 3]",
                    "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
                    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.trainer.global_step == steps and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    stories = cli.datamodule.story_examples(2)
    pictures = generate_stories(cli.model.generator(), stories, batch_size=2)
    assert [len(p) for p in pictures] == [3, 3] and pictures[0][0].shape == (3, 16, 16)
    scores = story_scores(stories, pictures)
    assert sorted(scores) == [1, 2, 3] and all(s["count"] == 2 for s in scores.values())
