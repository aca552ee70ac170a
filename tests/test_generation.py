"""Mixed-modal generation (``transfusion.generation``): the KV cache changes nothing but speed, a batch
changes nothing but speed, the cache never holds noisy states, bad options and prompts are refused.

A randomly initialised debug model in float64 stands in for a trained one. Its LM head is redrawn with
std 1 so that greedy text is not degenerate, and its patch decoder (zero-initialised: it would predict
eps = 0 whatever the context) with std 0.2 so that images depend on what the model attends to. Latents
of an untrained model are large (predict_x0 at t = T divides by sqrt(alpha_bar_T) ~ 3e-5), so latents are
compared relative to their magnitude.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from PIL import Image

from transfusion.data.embedded.shapes import ShapesDataset
from transfusion.generation import IMAGE, SamplingOptions, TransfusionGenerator
from transfusion.images import to_pil
from transfusion.models.attention import dense_mask
from transfusion.models.kv_cache import make_caches

RTOL = 1e-9  # float64; observed differences are ~1e-16


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def module(make_debug_transfusion):
    return make_debug_transfusion(redraw_lm_head=True)


@pytest.fixture(scope="module")
def images():
    ds = ShapesDataset(8, 16, seed=3)
    return [ds[i]["image"].double() for i in range(4)]


def kinds(segments) -> list[str]:
    return ["text" if isinstance(s, str) else "image" for s in segments]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def assert_same_outputs(a: list, b: list, rtol: float = RTOL) -> None:
    """Same segments: identical strings, image latents equal to ``rtol`` relative to their magnitude."""
    assert kinds(a) == kinds(b)
    for x, y in zip(a, b):
        if isinstance(x, str):
            assert x == y
        else:
            assert x.shape == y.shape
            assert torch.isfinite(x).all()
            assert rel_err(x, y) <= rtol, rel_err(x, y)


def generate(module, prompts, seeds=None, **options):
    options.setdefault("num_steps", 4)
    generator = TransfusionGenerator(module.model, module.autoencoder.model, module.tokenizer, SamplingOptions(**options))
    return generator.generate(prompts, seeds=seeds, decode=False)


# ---------------------------------------------------------------- cache == full recomputation

CASES = {
    "text": lambda imgs: ["a red circle in the"],
    "text->image": lambda imgs: ["a large blue square", IMAGE],
    "image->text": lambda imgs: [imgs[0]],
    "text->image->text": lambda imgs: ["a small green triangle", IMAGE],
}
EXPECTED_KINDS = {"text": ["text"], "text->image": ["image"], "image->text": ["text"],
                  "text->image->text": ["image", "text"]}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("cfg_scale", [3.0, 1.0])
@pytest.mark.parametrize("case", list(CASES))
def test_cache_matches_recompute(module, images, case, cfg_scale, sampler):
    prompt = CASES[case](images)
    new_tokens = 0 if case == "text->image" else 6
    outs = [generate(module, [prompt], seeds=[5], max_new_tokens=new_tokens, cfg_scale=cfg_scale, sampler=sampler,
                     use_cache=use_cache)[0] for use_cache in (True, False)]
    assert kinds(outs[0]) == EXPECTED_KINDS[case]
    assert all(len(s) > 0 for s in outs[0] if isinstance(s, str))
    assert_same_outputs(*outs)


def _boi_bias_for_mixed_output(module, logit_bias, prompt, **options) -> tuple[float, list]:
    """Smallest BOI logit bias under which greedy decoding writes text, then (itself) BOI and an image, then text."""
    for b in range(0, 60, 2):
        with logit_bias(module, {module.tokenizer.boi_id: float(b)}):
            out = generate(module, [prompt], seeds=[1], use_cache=True, **options)[0]
        k = kinds(out)
        if "image" in k and k[0] == "text" and "text" in k[k.index("image"):]:
            return float(b), out
    pytest.fail("no BOI bias in 0..58 made the model sample BOI between two texts")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("cfg_scale", [3.0, 1.0])
def test_cache_matches_recompute_when_model_samples_boi(module, cfg_scale, sampler, logit_bias):
    options = dict(max_new_tokens=12, cfg_scale=cfg_scale, sampler=sampler)
    prompt = ["a red circle"]
    bias, cached = _boi_bias_for_mixed_output(module, logit_bias, prompt, **options)  # searched with the cache
    with logit_bias(module, {module.tokenizer.boi_id: bias}):
        reference = generate(module, [prompt], seeds=[1], use_cache=False, **options)[0]
    assert_same_outputs(cached, reference)


@pytest.mark.parametrize("cfg_scale", [3.0, 1.0])
def test_several_images_in_one_generation(module, cfg_scale, logit_bias):
    """BOI always argmax: text -> image -> image -> image; the cache (and the unconditional rows' retired
    images) must not leak between images."""
    with logit_bias(module, {module.tokenizer.boi_id: 1e4}):
        outs = [generate(module, [["a white circle"], ["purple", IMAGE]], seeds=[7, 8], max_new_tokens=3,
                         cfg_scale=cfg_scale, use_cache=use_cache) for use_cache in (True, False)]
    assert kinds(outs[0][0]) == ["image"] * 3  # the sampled BOI is not text
    assert kinds(outs[0][1]) == ["image"] * 4  # the forced image, then three sampled ones
    for a, b in zip(*outs):
        assert_same_outputs(a, b)
    first = outs[0][0]
    assert min(rel_err(first[i], first[j]) for i in range(3) for j in range(i)) > 1e-3  # really distinct images


@pytest.mark.parametrize("image_cfg_scale", [None, 1.5], ids=["guidance", "editing-guidance"])
def test_cache_matches_recompute_when_guidance_rows_attend_apart(module, images, image_cfg_scale, monkeypatch):
    """Prompts far longer than their guidance rows' context: with the cache each row group attends over its own
    columns only (``RowGroups``), and nothing changes; text after the image too."""
    import transfusion.models.transformer as transformer
    from transfusion.models.attention import RowGroups

    grouped, attend = [], transformer.attend
    monkeypatch.setattr(transformer, "attend", lambda q, k, v, mask: grouped.append(isinstance(mask, RowGroups))
                        or attend(q, k, v, mask))
    long = " ".join(["there is a large yellow circle at the top right of the image"] * 3)
    prompts = [[images[0], long, IMAGE], ["red", IMAGE]]
    options = dict(max_new_tokens=4, cfg_scale=3.0, image_cfg_scale=image_cfg_scale)
    cached = generate(module, prompts, seeds=[3, 4], **options)
    assert any(grouped)
    grouped.clear()
    recomputed = generate(module, prompts, seeds=[3, 4], use_cache=False, **options)
    assert not any(grouped)
    for a, b in zip(cached, recomputed):
        assert kinds(a)[0] == "image"
        assert_same_outputs(a, b)


# ---------------------------------------------------------------- batch == one by one

def _mixed_prompts(images):
    return [
        "the",  # a bare string, the shortest prompt: most left padding
        ["there is a large yellow circle at the top right of the image", IMAGE],
        [images[1]],
        [images[2], "a small red square", IMAGE],
        ["a blue", images[3], "and then"],
    ]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.8),
                                      dict(temperature=1.3, top_p=1.0)], ids=["greedy", "top_p", "temperature"])
@pytest.mark.parametrize("cfg_scale", [3.0, 1.0])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "recompute"])
def test_batch_matches_one_by_one(module, images, sampling, cfg_scale, use_cache):
    prompts, seeds = _mixed_prompts(images), [11, 22, 33, 44, 55]
    options = dict(max_new_tokens=5, cfg_scale=cfg_scale, use_cache=use_cache, **sampling)
    batched = generate(module, prompts, seeds=seeds, **options)
    alone = [generate(module, [p], seeds=[s], **options)[0] for p, s in zip(prompts, seeds)]
    assert [kinds(o) for o in batched] == [["text"], ["image", "text"], ["text"], ["image", "text"], ["text"]]
    for a, b in zip(batched, alone):
        assert_same_outputs(a, b)


def test_batch_with_sampled_images_matches_one_by_one(module, images, logit_bias):
    """Rows reach BOI at different steps (one by bias, others forced): lock-step rows with padding."""
    prompts, seeds = ["a", ["green triangle", IMAGE], [images[0], "red"]], [3, 4, 5]
    options = dict(max_new_tokens=6, cfg_scale=3.0, temperature=0.7, top_p=0.9, sampler="ddim")
    with logit_bias(module, {module.tokenizer.boi_id: 21.0}):
        batched = generate(module, prompts, seeds=seeds, **options)
        alone = [generate(module, [p], seeds=[s], **options)[0] for p, s in zip(prompts, seeds)]
    assert sum(kinds(o).count("image") for o in batched) >= 2
    for a, b in zip(batched, alone):
        assert_same_outputs(a, b)


def test_seeds_matter_for_sampling(module):
    options = dict(max_new_tokens=8, cfg_scale=3.0, temperature=1.0)
    a = generate(module, [["a red circle", IMAGE]] * 2, seeds=[1, 2], **options)
    assert rel_err(a[0][0], a[1][0]) > 1e-3 and a[0][1] != a[1][1]
    b = generate(module, [["a red circle", IMAGE]], seeds=[1], **options)
    assert_same_outputs(a[0], b[0])


# ---------------------------------------------------------------- the cache holds committed, clean states only

def test_cache_never_stores_noisy_states(module, monkeypatch):
    num_steps = 4
    gen = module.generator(max_new_tokens=3, cfg_scale=3.0, num_steps=num_steps, use_cache=True)
    calls, runs = [], []
    start = gen._start
    monkeypatch.setattr(gen, "_start", lambda *args: runs.append(start(*args)) or runs[-1])  # the call's state

    def record(_, args, kwargs):  # before every model call: the cache holds exactly the committed positions
        t = kwargs.get("t", args[4] if len(args) > 4 else None)
        run = runs[-1]
        calls.append(([len(c) for c in run.caches], run.stream.tokens.shape[1], t, kwargs["pos"].clone()))

    handle = module.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = gen.generate([["a red circle", IMAGE], ["yellow", IMAGE]], seeds=[0, 1], decode=False)
    finally:
        handle.remove()
    assert [kinds(o)[0] for o in out] == ["image", "image"]
    noisy = [c for c in calls if c[2] is not None and int(c[2].max()) > 0]
    assert len(noisy) == num_steps  # one batched call per denoising step
    for lengths, committed, *_ in calls:
        assert lengths == [committed] * len(lengths)
    # every denoising step sees the patches at the positions they are finally committed at
    n = gen.patches_per_image
    commit = next(c for c in calls if c[2] is not None and int(c[2].max()) == 0 and c[3].shape[1] == n + 1)
    for *_, pos in noisy:
        assert torch.equal(pos, commit[3][:, :n])

    st, caches = runs[-1].stream, runs[-1].caches
    S = st.tokens.shape[1]
    assert all(len(c) == S for c in caches)
    # recompute every committed position from scratch: clean latents at t = 0
    ids = [int(i) for i in st.image_ids[st.image_ids >= 0].view(-1, gen.patches_per_image)[:, 0]]

    def from_scratch(latents):
        fresh = make_caches(len(caches))
        x = torch.stack([latents[i] for i in ids])
        mask = dense_mask(st.doc_ids, st.image_ids, module.model.cfg.bidirectional_images)
        with torch.no_grad():
            module.model(st.tokens, st.doc_ids, st.image_ids, x, torch.zeros(len(ids), dtype=torch.long),
                         mask=mask, pos=st.pos, caches=fresh)
        return fresh

    fresh = from_scratch(st.latents)
    # the unconditional rows' images were retired (doc -1) after use: their keys were computed while visible
    live = st.doc_ids >= 0
    B = len(out)
    assert live[B:].sum(1).tolist() == [1] * B  # unconditional rows: BOS alone is left in view
    for r in range(B):  # RoPE positions of a row's live positions count from 0 without gaps
        assert torch.equal(st.pos[r][live[r]], torch.arange(int(live[r].sum())))
    images = st.image_ids[:B] >= 0
    assert int((images & live[:B]).sum()) == int(images.sum()) == 2 * gen.patches_per_image
    for cached, recomputed in zip(caches, fresh):
        for name in ("k", "v"):
            a = getattr(cached, name)[:, :, :S].transpose(1, 2)[live]
            b = getattr(recomputed, name)[:, :, :S].transpose(1, 2)[live]
            assert rel_err(b, a) <= RTOL, (name, rel_err(b, a))
    # the check is sensitive: other image latents give other keys at the image positions
    fresh = from_scratch({i: torch.randn_like(x) for i, x in st.latents.items()})
    image_pos = live & (st.image_ids >= 0)
    a, b = caches[0].k[:, :, :S].transpose(1, 2)[image_pos], fresh[0].k[:, :, :S].transpose(1, 2)[image_pos]
    assert rel_err(a, b) > 1e-3


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, name", [
    (dict(cfg_scale=-1.0), "cfg_scale"), (dict(num_steps=0), "num_steps"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(sampler="foo"), "sampler"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_invalid_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingOptions(**kwargs)


def test_invalid_options_through_the_module(module):
    with pytest.raises(ValueError, match="cfg_scale"):
        module.generator(cfg_scale=-2.0)
    with pytest.raises(ValueError, match="sampler"):
        module.generator(sampler="foo")
    with pytest.raises(ValueError, match="num_steps"):
        module.generator(num_steps=0)


def test_invalid_prompts(module, images):
    gen = module.generator(max_new_tokens=2, cfg_scale=1.0, num_steps=2)
    assert module.config.transformer.max_seq_len == 256
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate([" ".join(["red"] * 300)])
    with pytest.raises(ValueError, match="max_seq_len"):  # fits as text, but not with the image it asks for
        gen.generate([[" ".join(["red"] * 252), IMAGE]])
    big = ShapesDataset(1, 32, seed=0)[0]["image"].double()
    with pytest.raises(ValueError, match="image_size"):
        gen.generate([[big]])
    with pytest.raises(ValueError, match="image_size"):
        gen.generate([[to_pil(big)]])
    for mode in ("L", "RGBA"):
        with pytest.raises(ValueError, match="mode"):
            gen.generate([[to_pil(images[0]).convert(mode)]])
    with pytest.raises(ValueError, match="only text and IMAGE"):  # interleaved prompts: no input image after IMAGE
        gen.generate([["a", IMAGE, images[0]]])
    with pytest.raises(ValueError, match="max_seq_len"):  # each later IMAGE counts too
        gen.generate([[" ".join(["red"] * 245), IMAGE, "red", IMAGE, IMAGE]])
    with pytest.raises(ValueError, match="image"):
        gen.generate([[images[0][:1]]])  # one channel
    with pytest.raises(ValueError, match="seeds"):
        gen.generate(["a", "b"], seeds=[1])
    assert gen.generate([]) == []


# ---------------------------------------------------------------- helpers and stopping

def test_generate_images(module):
    captions = ["a red circle", "a large blue square in the top left", "green"]
    out = module.generator(cfg_scale=3.0, num_steps=3).generate_images(captions, seeds=[4, 5, 6])
    assert out.shape == (3, 3, 16, 16)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    again = module.generator(cfg_scale=3.0, num_steps=3, use_cache=False).generate_images(captions, seeds=[4, 5, 6])
    assert rel_err(out, again) <= 1e-6  # decoded pixels (clamped) of the same latents


def test_generate_captions_and_eos(module, images, logit_bias):
    batch = torch.stack(images[:3])
    captions = module.generate_captions(batch, sampling=replace(module.sampling, max_new_tokens=6))
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert captions == module.generator(use_cache=False).generate_captions(list(batch), max_new_tokens=6)
    with logit_bias(module, {module.tokenizer.eos_id: 1e4}):  # EOS first: nothing is generated
        assert module.generate_captions(batch, sampling=replace(module.sampling, max_new_tokens=6)) == ["", "", ""]
        out = generate(module, ["a red circle", ["a", IMAGE]], max_new_tokens=6, cfg_scale=3.0)
        assert kinds(out[0]) == [] and kinds(out[1]) == ["image"]


def test_generation_stops_at_eos(module, logit_bias):
    """With EOS favoured enough to come after a few tokens, a larger budget changes nothing."""
    prompt = ["there is a small white triangle"]
    for bias in range(0, 60, 2):  # the smallest bias that ends the text within the short budget
        with logit_bias(module, {module.tokenizer.eos_id: float(bias)}):
            short = generate(module, [prompt], max_new_tokens=12, cfg_scale=1.0)[0]
            if short and 0 < len(module.tokenizer.encode(short[0])) < 12:
                assert generate(module, [prompt], max_new_tokens=40, cfg_scale=1.0)[0] == short
                return
    pytest.fail("no EOS bias in 0..58 stopped generation after a few tokens")


def test_banned_tokens_never_sampled(module, logit_bias):
    tok = module.tokenizer
    with logit_bias(module, {tok.pad_id: 1e4, tok.eoi_id: 9e3, tok.bos_id: 8e3}):
        text = generate(module, ["a red"], max_new_tokens=5, cfg_scale=1.0, temperature=0.0)[0]
    assert kinds(text) == ["text"] and text[0]  # neither PAD, EOI nor BOS: real text


# ---------------------------------------------------------------- edge cases

def test_pil_prompt_on_float64_module(module, images):
    pil = to_pil(images[0])
    a = generate(module, [[pil]], max_new_tokens=4, cfg_scale=1.0)
    b = generate(module, [[images[0]]], max_new_tokens=4, cfg_scale=1.0)
    assert a == b


def test_pil_prompt_on_float32_module(module, images):
    m32 = copy.deepcopy(module).float()
    pil = to_pil(images[0])
    assert isinstance(pil, Image.Image) and pil.mode == "RGB"
    a = generate(m32, [[pil]], max_new_tokens=4, cfg_scale=1.0)
    b = generate(m32, [[images[0].float()]], max_new_tokens=4, cfg_scale=1.0)
    assert a == b and kinds(a[0]) == ["text"]


def test_image_that_exactly_fits_the_context(module):
    n, max_len = module.config.patches_per_image, module.config.transformer.max_seq_len
    text = " ".join(["red"] * (max_len - n - 3))  # BOS + text + BOI + n patches + EOI == max_seq_len
    assert len(module.tokenizer.encode(text)) == max_len - n - 3
    out = generate(module, [[text, IMAGE]], max_new_tokens=0, cfg_scale=1.0, num_steps=2)
    assert kinds(out[0]) == ["image"]


def test_sampled_boi_without_room_stops_cleanly(module, logit_bias):
    text = " ".join(["red"] * 250)  # BOS + 250 tokens; BOI sampled at 251 leaves no room for 4 patches + EOI
    with logit_bias(module, {module.tokenizer.boi_id: 1e4}):
        out = generate(module, [text], max_new_tokens=4, cfg_scale=1.0, num_steps=2)
    assert kinds(out[0]) == []
