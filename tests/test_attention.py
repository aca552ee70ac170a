"""Transfusion attention: mask semantics, RoPE positions, isolation through the real model, FlexAttention == SDPA.

Rule under test (paper section 3): query q may attend key k iff both lie in the same document and either
k <= q (causal) or q and k are patches of the same image.
"""

from __future__ import annotations

import pytest
import torch

from torch.nn.attention.flex_attention import BlockMask

from transfusion.models.attention import attend, block_mask, dense_mask, positions
from transfusion.models.transformer import TransformerConfig
from transfusion.models.transfusion import Transfusion, TransfusionConfig

PAD, BOI, EOI = 3, 4, 5


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ---------------------------------------------------------------- helpers


def pack(rows, L):
    """Rows of documents -> (tokens, doc_ids, image_ids, image keys in order of appearance).

    ``rows``: list of rows; a row is a list of documents; a document is a list of items, each an int token
    or ``("img", key, n)`` for the n patches of image ``key``. Padding gets doc id L and token PAD.
    """
    B = len(rows)
    tokens = torch.full((B, L), PAD, dtype=torch.long)
    doc_ids = torch.full((B, L), L, dtype=torch.long)
    image_ids = torch.full((B, L), -1, dtype=torch.long)
    keys = []
    for b, row in enumerate(rows):
        i = 0
        for d, doc in enumerate(row):
            for item in doc:
                if isinstance(item, tuple):
                    _, key, n = item
                    image_ids[b, i:i + n] = len(keys)
                    tokens[b, i:i + n] = PAD
                    doc_ids[b, i:i + n] = d
                    keys.append(key)
                    i += n
                else:
                    tokens[b, i], doc_ids[b, i] = item, d
                    i += 1
        assert i <= L
    return tokens, doc_ids, image_ids, keys


def reference_mask(doc_ids, image_ids, bidirectional=True):
    """The rule, written out with Python loops."""
    B, L = doc_ids.shape
    m = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for q in range(L):
            for k in range(L):
                if doc_ids[b, q] != doc_ids[b, k]:
                    continue
                same_img = bidirectional and image_ids[b, q] >= 0 and image_ids[b, q] == image_ids[b, k]
                m[b, 0, q, k] = bool(k <= q or same_img)
    return m


# The hand-built layout used throughout (n = 4 patches per image), L = 20:
#   row 0: doc 0 = T T [A A A A] T [B B B B] T   (0..11)   A = image 0 at 2..5, B = image 1 at 7..10
#          doc 1 = T [C C C C] T                  (12..17)  C = image 2 at 13..16
#          padding                                (18, 19)
#   row 1: doc 0 = T [D D D D] T T                (0..6)    D = image 3 at 1..4
#          doc 1 = T T T                          (7..9)
#          padding                                (10..19)
N_PATCH = 4
L_SMALL = 20
A, B_, C, D = (slice(2, 6), slice(7, 11), slice(13, 17), slice(1, 5))


def small_batch():
    n = N_PATCH
    rows = [
        [[10, 11, ("img", "A", n), 12, ("img", "B", n), 13], [14, ("img", "C", n), 15]],
        [[16, ("img", "D", n), 17, 18], [19, 20, 21]],
    ]
    tokens, doc_ids, image_ids, keys = pack(rows, L_SMALL)
    assert keys == ["A", "B", "C", "D"]
    return tokens, doc_ids, image_ids


# ---------------------------------------------------------------- dense_mask semantics


def test_dense_mask_hand_built_entries():
    _, doc_ids, image_ids = small_batch()
    m = dense_mask(doc_ids, image_ids)
    assert m.shape == (2, 1, L_SMALL, L_SMALL) and m.dtype == torch.bool
    r = m[0, 0]

    # the diagonal is always allowed (padding included)
    assert m[:, 0].diagonal(dim1=-2, dim2=-1).all()
    # text is causal
    assert r[1, 0] and r[6, 0] and r[6, 1]
    assert not r[0, 1] and not r[1, 6] and not r[6, 11]
    # text before an image never sees its patches; text after sees all of them
    assert not r[1, A].any()
    assert r[6, A].all() and r[11, A].all() and r[11, B_].all()
    # an image is a full block: an earlier patch attends a later patch of the same image
    assert r[2, 5] and r[5, 2]
    assert r[A, A].all() and r[B_, B_].all() and r[C, C].all()
    # image patches see the text before them, never a later text token
    assert r[A, 0:2].all()
    assert not r[A, 6].any() and not r[5, 6] and not r[B_, 11].any()
    # a later image sees an earlier image of its document (causally); an earlier image never sees a later one
    assert r[B_, A].all()
    assert not r[A, B_].any()
    # documents are isolated in both directions (including images)
    assert not r[12:18, 0:12].any() and not r[0:12, 12:18].any()
    assert not r[C, A].any() and not r[C, B_].any() and not r[A, C].any()
    assert r[C, 12].all() and not r[C, 17].any() and r[17, C].all()
    # padding: its own document, causal
    assert r[19, 18] and not r[18, 19]
    assert not r[18:, :18].any() and not r[:18, 18:].any()

    # row 1: the second row has its own images and documents
    r1 = m[1, 0]
    assert r1[1, 4] and r1[4, 1] and not r1[D, 5].any() and r1[5, D].all()
    assert not r1[7:10, 0:7].any() and not r1[0:7, 7:10].any()


def test_dense_mask_matches_reference_rule():
    _, doc_ids, image_ids = small_batch()
    for bidirectional in (True, False):
        assert torch.equal(dense_mask(doc_ids, image_ids, bidirectional), reference_mask(doc_ids, image_ids, bidirectional))


def test_dense_mask_random_layouts_match_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        L = 40
        rows = []
        for _ in range(2):
            row, used = [], 0
            while True:
                doc = []
                for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
                    if torch.rand((), generator=g) < 0.5:
                        doc.append(("img", f"{trial}", int(torch.randint(1, 6, (1,), generator=g))))
                    else:
                        doc.append(int(torch.randint(6, 60, (1,), generator=g)))
                size = sum(it[2] if isinstance(it, tuple) else 1 for it in doc)
                if used + size > L - 2:
                    break
                row.append(doc)
                used += size
            rows.append(row)
        _, doc_ids, image_ids, _ = pack(rows, L)
        assert torch.equal(dense_mask(doc_ids, image_ids), reference_mask(doc_ids, image_ids))


def test_dense_mask_causal_within_document_when_not_bidirectional():
    _, doc_ids, image_ids = small_batch()
    m = dense_mask(doc_ids, image_ids, bidirectional=False)
    L = L_SMALL
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    assert torch.equal(m, (same_doc & causal)[:, None])
    # no image block any more: an earlier patch does not see a later one
    assert not m[0, 0, 2, 5]


def test_positions_restart_per_document():
    _, doc_ids, _ = small_batch()
    pos = positions(doc_ids)
    assert pos.dtype == torch.long and pos.shape == doc_ids.shape
    assert pos[0].tolist() == list(range(12)) + list(range(6)) + [0, 1]
    assert pos[1].tolist() == list(range(7)) + list(range(3)) + list(range(10))
    # a single-document row gets plain positions
    one = torch.zeros(1, 9, dtype=torch.long)
    assert positions(one)[0].tolist() == list(range(9))
    # a document of length one
    ids = torch.tensor([[0, 1, 2, 2, 7]])
    assert positions(ids)[0].tolist() == [0, 0, 0, 1, 0]


# ---------------------------------------------------------------- through the real model


def make_model(encoder="linear", bidirectional=True, dtype=torch.float64, attention="sdpa", seed=0, L=256):
    torch.manual_seed(seed)
    cfg = TransfusionConfig(
        transformer=TransformerConfig.from_name("debug", max_seq_len=L), vocab_size=64, latent_channels=4,
        latent_size=4, patch_size=2, patch_encoder=encoder, unet_channels=64, bidirectional_images=bidirectional,
        attention=attention,
    )
    assert cfg.patches_per_image == N_PATCH
    model = Transfusion(cfg)
    with torch.no_grad():  # the decoders start at zero: give them weights so eps depends on the hidden states
        for p in model.patch_decoder.parameters():
            p.normal_(std=0.05)
    return model.to(dtype).eval()


def run(model, tokens, doc_ids, image_ids, x, t):
    with torch.no_grad():
        return model(tokens, doc_ids, image_ids, x, t)


def inputs(seed=1, dtype=torch.float64):
    tokens, doc_ids, image_ids = small_batch()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 4, 4, generator=g, dtype=dtype)  # images A, B, C, D
    t = torch.tensor([100, 400, 700, 900])
    return tokens, doc_ids, image_ids, x, t


def same(a, b):
    return torch.allclose(a, b, rtol=0, atol=1e-12)


def differs(a, b):
    return (a - b).abs().max() > 1e-6


ENCODERS = ["linear", "unet"]


def test_later_patch_of_same_image_changes_earlier_patches():
    """Linear encoder: patches are encoded independently, so the only route is bidirectional attention."""
    model = make_model("linear")
    tokens, doc_ids, image_ids, x, t = inputs()
    h0, _ = run(model, tokens, doc_ids, image_ids, x, t)
    x2 = x.clone()
    x2[0, :, 2:, 2:] += 1.0  # image A, last patch only (raster order: bottom-right 2x2 block)
    h1, _ = run(model, tokens, doc_ids, image_ids, x2, t)
    for p in range(2, 5):  # A's first three patches
        assert differs(h1[0, p], h0[0, p]), p
    assert same(h1[0, :2], h0[0, :2])  # text before the image is unaffected

    causal = make_model("linear", bidirectional=False)
    c0, _ = run(causal, tokens, doc_ids, image_ids, x, t)
    c1, _ = run(causal, tokens, doc_ids, image_ids, x2, t)
    assert same(c1[0, :5], c0[0, :5])  # without the image block, earlier patches cannot see the last one
    assert differs(c1[0, 5], c0[0, 5])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_later_image_leaves_earlier_tokens_unchanged(encoder):
    model = make_model(encoder)
    tokens, doc_ids, image_ids, x, t = inputs()
    h0, e0 = run(model, tokens, doc_ids, image_ids, x, t)
    x2 = x.clone()
    x2[1] += torch.randn(x[1].shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)  # image B
    h1, e1 = run(model, tokens, doc_ids, image_ids, x2, t)
    assert same(h1[0, :7], h0[0, :7])  # text, image A, text before B
    assert differs(h1[0, B_], h0[0, B_]) and differs(h1[0, 11], h0[0, 11])
    assert same(h1[0, 12:], h0[0, 12:])  # doc 1 and padding
    assert same(h1[1], h0[1])  # the other row
    assert same(e1[0], e0[0]) and same(e1[2], e0[2]) and same(e1[3], e0[3])
    assert differs(e1[1], e0[1])

    t2 = t.clone()
    t2[1] = 5  # B's timestep only
    h2, _ = run(model, tokens, doc_ids, image_ids, x, t2)
    assert same(h2[0, :7], h0[0, :7]) and differs(h2[0, B_], h0[0, B_])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_later_text_leaves_earlier_tokens_unchanged(encoder):
    model = make_model(encoder)
    tokens, doc_ids, image_ids, x, t = inputs()
    h0, e0 = run(model, tokens, doc_ids, image_ids, x, t)

    tok = tokens.clone()
    tok[0, 11] = 40  # last text token of doc 0
    h1, e1 = run(model, tok, doc_ids, image_ids, x, t)
    assert same(h1[0, :11], h0[0, :11]) and differs(h1[0, 11], h0[0, 11])
    assert same(e1, e0)  # no patch comes after it

    tok = tokens.clone()
    tok[0, 6] = 40  # the text token between images A and B
    h2, e2 = run(model, tok, doc_ids, image_ids, x, t)
    assert same(h2[0, :6], h0[0, :6])  # image A never sees later text
    assert same(e2[0], e0[0])
    assert differs(h2[0, B_], h0[0, B_]) and differs(e2[1], e0[1])  # image B does see it
    assert same(h2[0, 12:], h0[0, 12:]) and same(h2[1], h0[1])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_packed_documents_isolated_both_directions(encoder):
    model = make_model(encoder)
    tokens, doc_ids, image_ids, x, t = inputs()
    h0, e0 = run(model, tokens, doc_ids, image_ids, x, t)

    # perturbing doc 0 (its first token and its first image) leaves doc 1 and padding unchanged
    tok = tokens.clone()
    tok[0, 0] = 41
    x2 = x.clone()
    x2[0] = -x2[0]
    h1, e1 = run(model, tok, doc_ids, image_ids, x2, t)
    assert differs(h1[0, 0], h0[0, 0]) and differs(h1[0, 11], h0[0, 11])
    assert same(h1[0, 12:], h0[0, 12:]) and same(e1[2], e0[2])

    # perturbing doc 1 (its first token and its image) leaves doc 0 unchanged
    tok = tokens.clone()
    tok[0, 12] = 41
    x3 = x.clone()
    x3[2] = -x3[2]
    h2, e2 = run(model, tok, doc_ids, image_ids, x3, t)
    assert differs(h2[0, 17], h0[0, 17]) and differs(e2[2], e0[2])
    assert same(h2[0, :12], h0[0, :12]) and same(e2[:2], e0[:2])
    assert same(h2[0, 18:], h0[0, 18:])

    # row 1: doc 0 (with image D) and doc 1
    tok = tokens.clone()
    tok[1, 7] = 41
    h3, _ = run(model, tok, doc_ids, image_ids, x, t)
    assert same(h3[1, :7], h0[1, :7]) and differs(h3[1, 8], h0[1, 8])
    tok = tokens.clone()
    tok[1, 0] = 41
    h4, _ = run(model, tok, doc_ids, image_ids, x, t)
    assert same(h4[1, 7:], h0[1, 7:]) and differs(h4[1, D], h0[1, D])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_document_hidden_states_independent_of_packing_offset(encoder):
    """RoPE positions restart per document: a document packed after another equals the same document alone."""
    model = make_model(encoder)
    n = N_PATCH
    doc_x = [20, 21, ("img", "X", n), 22, 23]
    doc_y = [30, ("img", "Y", n), 31, 32, 33, 34]
    g = torch.Generator().manual_seed(3)
    lat = {"X": torch.randn(4, 4, 4, generator=g, dtype=torch.float64),
           "Y": torch.randn(4, 4, 4, generator=g, dtype=torch.float64)}
    ts = {"X": 250, "Y": 600}
    L = 24

    def forward(rows):
        tokens, doc_ids, image_ids, keys = pack(rows, L)
        x = torch.stack([lat[k] for k in keys])
        t = torch.tensor([ts[k] for k in keys])
        return run(model, tokens, doc_ids, image_ids, x, t), keys

    (h_alone, e_alone), _ = forward([[doc_x]])
    (h_packed, e_packed), keys = forward([[doc_y, doc_x]])
    assert keys == ["Y", "X"]
    len_x, off = 4 + n, 5 + n
    torch.testing.assert_close(h_packed[0, off:off + len_x], h_alone[0, :len_x], rtol=0, atol=1e-10)
    torch.testing.assert_close(e_packed[1], e_alone[0], rtol=0, atol=1e-10)

    # the model's forward is exactly: embed, scatter the encoded patches, transformer at per-document positions
    tokens, doc_ids, image_ids, keys = pack([[doc_y, doc_x]], L)
    x = torch.stack([lat[k] for k in keys])
    t = torch.tensor([ts[k] for k in keys])
    with torch.no_grad():
        emb = model.embedding(tokens).masked_scatter((image_ids >= 0)[..., None], model.patch_encoder(x, t)[0])
        h_manual = model.transformer(emb, positions(doc_ids), dense_mask(doc_ids, image_ids))
    torch.testing.assert_close(h_manual, h_packed, rtol=0, atol=1e-12)


def test_positions_restart_lets_packed_rows_exceed_max_seq_len():
    """Only positions inside a document count against max_seq_len: a 24-token row of two short documents runs
    under max_seq_len=16, a single 17-token document does not."""
    model = make_model("linear", L=16)
    n = N_PATCH
    tokens, doc_ids, image_ids, keys = pack([[[20, 21, ("img", "X", n), 22, 23], [30, ("img", "Y", n), 31, 32]],
                                             [[40] * 16, [41] * 8]], 24)
    x = torch.randn(len(keys), 4, 4, 4, dtype=torch.float64)
    t = torch.tensor([10, 20])
    assert positions(doc_ids).max() < 16
    h, eps = run(model, tokens, doc_ids, image_ids, x, t)
    assert h.shape == (2, 24, 64) and eps.shape == (2, 4, 4, 4) and torch.isfinite(h).all()
    tokens, doc_ids, image_ids, _ = pack([[[40] * 17]], 17)
    with pytest.raises(ValueError, match="max_seq_len"):
        run(model, tokens, doc_ids, image_ids, None, None)


# ---------------------------------------------------------------- FlexAttention vs dense SDPA

# Shapes shared by the kernel test and the model test (the debug preset has 4 heads of width 16), so the
# compiled FlexAttention kernel (dynamic=False) is built once: ~20-45 s on a 2-core CPU on a cold cache.
FB, FH, FL, FDh = 2, 4, 256, 16


def flex_batch():
    """Two rows of length 256 (two 128 blocks) with several images and packed documents."""
    n = 16
    rows = [
        # doc 0 fills exactly the first block (0..127), so block (1, 0) is fully masked and skipped
        [[1] + list(range(6, 26)) + [BOI, ("img", "a", n), EOI] + list(range(26, 56)) + [BOI, ("img", "b", n), EOI]
         + list(range(56, 96)) + [2],
         [1, BOI, ("img", "c", n), EOI] + list(range(6, 40)) + [2],
         [1] + list(range(6, 30)) + [BOI, ("img", "d", n), EOI, 2]],
        [[1] + list(range(6, 12)) + [BOI, ("img", "e", n), EOI, BOI, ("img", "f", n), EOI] + list(range(6, 100)) + [2],
         [1, BOI, ("img", "g", n), EOI] + list(range(10, 30))],
    ]
    tokens, doc_ids, image_ids, keys = pack(rows, FL)
    assert doc_ids[0, 127] == 0 and doc_ids[0, 128] == 1
    assert (doc_ids[:, -1] == FL).all()  # both rows end with padding
    return tokens, doc_ids, image_ids, keys


def flex_or_skip(fn):
    """Run fn; skip (with the reason) only if this CPU build cannot compile FlexAttention at all."""
    try:
        return fn()
    except (torch._dynamo.exc.BackendCompilerFailed, NotImplementedError) as e:  # InductorError is a subclass
        pytest.skip(f"FlexAttention cannot be compiled/run on this CPU build: {type(e).__name__}: {str(e)[:300]}")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit internals of the compile
def test_flex_block_mask_matches_dense_mask():
    torch.manual_seed(0)
    _, doc_ids, image_ids, _ = flex_batch()
    q, k, v = (torch.randn(FB, FH, FL, FDh) for _ in range(3))
    bm = block_mask(doc_ids, image_ids, block_size=128)
    out_flex = flex_or_skip(lambda: attend(q, k, v, bm))
    dense = dense_mask(doc_ids, image_ids)
    out_dense = attend(q, k, v, dense)
    assert out_flex.shape == out_dense.shape == (FB, FH, FL, FDh)
    torch.testing.assert_close(out_flex, out_dense, rtol=0, atol=1e-5)
    # the mask matters: plain causal attention gives a different result
    out_causal = attend(q, k, v, dense_mask(doc_ids, image_ids, bidirectional=False))
    assert (out_causal - out_dense).abs().max() > 1e-3

    # the block mask keeps exactly the 128 x 128 blocks that contain an allowed pair
    blocks = dense[:, :, :, :].view(FB, 1, 2, 128, 2, 128).any(dim=(3, 5))  # (B, 1, 2, 2)
    assert torch.equal(bm.to_dense().bool(), blocks)
    assert not blocks[0, 0, 1, 0]  # doc boundary at 128: the off-diagonal block of row 0 is skipped

    # bidirectional=False through FlexAttention equals the causal dense mask
    bm_c = block_mask(doc_ids, image_ids, bidirectional=False, block_size=128)
    torch.testing.assert_close(attend(q, k, v, bm_c), out_causal, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit internals of the compile
def test_transfusion_forward_flex_matches_sdpa():
    tokens, doc_ids, image_ids, keys = flex_batch()
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 1000, (len(keys),), generator=g)
    sdpa16 = make_model_16(attention="sdpa")
    flex16 = make_model_16(attention="flex", seed=7)
    flex16.load_state_dict(sdpa16.state_dict())
    x = torch.randn(len(keys), 4, 8, 8, generator=g)
    assert isinstance(flex16.attention_mask(doc_ids, image_ids), BlockMask)
    assert isinstance(sdpa16.attention_mask(doc_ids, image_ids), torch.Tensor)
    h_s, e_s = run(sdpa16, tokens, doc_ids, image_ids, x, t)
    h_f, e_f = flex_or_skip(lambda: run(flex16, tokens, doc_ids, image_ids, x, t))
    torch.testing.assert_close(h_f, h_s, rtol=0, atol=1e-4)
    torch.testing.assert_close(e_f, e_s, rtol=0, atol=1e-4)


def make_model_16(attention, seed=0):
    torch.manual_seed(seed)
    cfg = TransfusionConfig(
        transformer=TransformerConfig.from_name("debug"), vocab_size=128, latent_channels=4, latent_size=8,
        patch_size=2, patch_encoder="linear", attention=attention,
    )
    assert cfg.patches_per_image == 16 and cfg.transformer.n_heads == FH and cfg.transformer.head_dim == FDh
    model = Transfusion(cfg)
    with torch.no_grad():
        for p in model.patch_decoder.parameters():
            p.normal_(std=0.05)
    return model.eval()


def test_chunked_dense_attention_equals_one_masked_call(one_thread):
    """Long CPU rows take the chunked path (keys a query chunk cannot see are skipped): same values and gradients."""
    from transfusion.models.attention import attend, chunked_attention, dense_mask

    torch.manual_seed(0)
    L = 600
    doc_ids = torch.cat([torch.zeros(250), torch.ones(300), torch.full((50,), 2)]).long()[None].repeat(2, 1)
    doc_ids[1] = 0
    image_ids = torch.full((2, L), -1)
    image_ids[0, 240:256] = 0  # an image across the first chunk boundary
    image_ids[1, 500:520] = 1
    mask = dense_mask(doc_ids, image_ids)
    q, k, v = (torch.randn(2, 2, L, 16, requires_grad=True) for _ in range(3))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    chunked = attend(q, k, v, mask)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(chunked.square().sum(), (q, k, v)),
                               torch.autograd.grad(full.square().sum(), (q, k, v)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked_attention(q, k, v, mask, chunk=64), full, rtol=1e-5, atol=1e-6)
