"""Current open LLM families (Llama 3 with GQA and llama3 RoPE scaling, Qwen2, Qwen3, Mistral) in our transformer:
folders that ``transformers`` itself wrote load with equal logits and greedy continuations, and save back in their
own layout; grouped-query attention keeps only its K/V heads in the cache and equals full recompute."""

import json

import pytest
import torch

from transfusion.flops import attention_width, flop_parameters
from transfusion.models.attention import attend, dense_mask
from transfusion.models.kv_cache import make_caches
from transfusion.models.llama import load_llama, read_llama_config, save_llama
from transfusion.models.transformer import TransformerConfig, rope_inv_freq
from transfusion.models.transfusion import Transfusion, TransfusionConfig

transformers = pytest.importorskip("transformers")

VOCAB = 300
SCALE = 0.1  # weight std
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {  # family -> (config class, model class, settings beyond COMMON)
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False)),
}


def write_tokenizer_json(path) -> None:
    """A word-level tokenizer.json over the test vocabulary (Qwen folders ship tokenizer.json only)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0")).save(str(path))


def make_family(directory, family: str, seed: int = 0):
    """A tiny random ``XForCausalLM`` saved by transformers (2 shards), with a tokenizer.json beside it."""
    config_class, model_class, settings = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **settings})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)._from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # norm weights and biases random too, so a mapping mistake shows
        for name, p in model.named_parameters():
            std = SCALE / 4 if "embed_tokens" in name else SCALE  # a tied LM head would echo a large embedding
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else std * torch.randn_like(p))
    model.save_pretrained(directory, max_shard_size="150KB")
    write_tokenizer_json(directory / "tokenizer.json")
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (folder, the transformers model that wrote it)."""
    with torch.random.fork_rng():
        return {f: (d, make_family(d, f)) for f in FAMILIES for d in [tmp_path_factory.mktemp(f)]}


def ours_from(directory) -> Transfusion:
    config, state = load_llama(directory)
    kwargs = {k: v for k, v in config.items() if k in TransformerConfig.__dataclass_fields__}
    model = Transfusion(TransfusionConfig(transformer=TransformerConfig(**kwargs), vocab_size=config["vocab_size"],
                                          attention="sdpa"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and all(k.startswith(("patch_encoder.", "patch_decoder.")) for k in missing)
    return model.eval()


def prompts(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def our_logits(model: Transfusion, tokens: torch.Tensor) -> torch.Tensor:
    hidden, _ = model(tokens, doc_ids=torch.zeros_like(tokens), image_ids=torch.full_like(tokens, -1))
    return model.lm_head(hidden)


@torch.no_grad()
def cached_greedy(model: Transfusion, tokens: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation decoded one token at a time through the KV caches: (B, steps) ids and their logits."""
    B, P = tokens.shape
    caches = make_caches(model.cfg.transformer.n_layers)
    hidden, _ = model(tokens, torch.zeros_like(tokens), torch.full_like(tokens, -1), caches=caches)
    out, logits = [], []
    for step in range(steps):
        logits.append(model.lm_head(hidden[:, -1]))
        out.append(logits[-1].argmax(-1))
        new = out[-1][:, None]
        hidden, _ = model(new, torch.zeros_like(new), torch.full_like(new, -1), pos=torch.full_like(new, P + step),
                          mask=torch.ones(B, 1, 1, P + step + 1, dtype=torch.bool), caches=caches)
    assert caches[0].k.shape[1] == model.cfg.transformer.kv_heads  # only the K/V heads are stored
    return torch.stack(out, 1), torch.stack(logits, 1)


def test_configs_map_the_family_switches(folders):
    shapes = {f: read_llama_config(folders[f][0]) for f in FAMILIES}
    assert {k: v for k, v in shapes["llama3"].items() if k.startswith("rope_")} == {
        "rope_theta": 1e4, "rope_type": "llama3", "rope_factor": 8.0, "rope_low_freq_factor": 1.0,
        "rope_high_freq_factor": 4.0, "rope_original_max_seq_len": 32}
    fields = TransformerConfig.__dataclass_fields__
    assert TransformerConfig(**{k: v for k, v in shapes["llama3"].items() if k in fields}).rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert shapes["llama3"]["architecture"] is None and shapes["mistral"]["architecture"] == "MistralForCausalLM"
    assert all(s["n_kv_heads"] == 2 for s in shapes.values())
    assert (shapes["qwen2"]["qkv_bias"], shapes["qwen2"]["tie_word_embeddings"], shapes["qwen2"]["rope_theta"]) == (
        True, True, 1e6)
    assert (shapes["qwen3"]["qk_rmsnorm"], shapes["qwen3"]["head_width"]) == (True, 32)
    assert not shapes["llama3"]["qkv_bias"] and not shapes["mistral"]["qk_rmsnorm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_match_transformers(folders, family, one_thread):
    directory, hf = folders[family]
    model = ours_from(directory)
    tokens = prompts()
    with torch.no_grad():
        reference = hf(tokens).logits
    ours = our_logits(model, tokens)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)

    with torch.no_grad():
        hf_ids = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=20, do_sample=False,
                             pad_token_id=0)[:, tokens.shape[1]:]
    ids, _ = cached_greedy(model, tokens, 20)
    assert torch.equal(ids, hf_ids)


def test_llama3_rope_scaling_changes_the_result(folders, one_thread):
    """The test model's scaling is not a no-op: without it, logits move far past the tolerance."""
    directory, hf = folders["llama3"]
    model = ours_from(directory)
    cfg = model.cfg.transformer
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    assert not torch.equal(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), plain)
    torch.testing.assert_close(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                               hf.model.rotary_emb.inv_freq, atol=0, rtol=0)
    tokens = prompts(1)
    scaled = our_logits(model, tokens)
    cfg.rope_type = "default"  # the same weights with plain RoPE
    assert (our_logits(model, tokens) - scaled).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_save_round_trips_in_the_family_layout(folders, family, tmp_path, one_thread):
    directory, hf = folders[family]
    model = ours_from(directory)
    config, _ = load_llama(directory)
    save_llama(model, config["tokenizer_path"], tmp_path)
    saved, original = (json.loads((d / "config.json").read_text()) for d in (tmp_path, directory))
    for field in ("model_type", "architectures", "num_key_value_heads", "tie_word_embeddings"):
        assert saved[field] == original[field], field
    assert (tmp_path / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()
    again = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path, attn_implementation="eager",
                                                                       dtype=torch.float32).eval()
    tokens = prompts(2)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, hf(tokens).logits, atol=1e-5, rtol=0)
    assert read_llama_config(tmp_path) == read_llama_config(directory)


def test_cached_gqa_decode_equals_full_recompute(folders, one_thread):
    model = ours_from(folders["qwen3"][0])
    tokens = prompts(3)
    ids, logits = cached_greedy(model, tokens, 8)
    full = our_logits(model, torch.cat([tokens, ids], 1))[:, tokens.shape[1] - 1:-1]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)


def test_gqa_attention_equals_repeated_heads():
    """SDPA with H / Hkv query heads per K/V head equals multi-head attention over K/V heads repeated in place."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 16, generator=g, dtype=torch.float64) for h in (6, 2, 2))
    doc = torch.tensor([[0] * 5 + [1] * 4, [0] * 9])
    img = torch.tensor([[-1, 0, 0, 0, -1, -1, 1, 1, -1], [-1] * 9])
    mask = dense_mask(doc, img)
    expected = attend(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask)
    torch.testing.assert_close(attend(q, k, v, mask), expected, atol=1e-12, rtol=0)


def test_gqa_config_parameters_and_defaults():
    cfg = TransformerConfig(dim=64, n_heads=4, n_kv_heads=2, head_width=32, qkv_bias=True)
    model = Transfusion(TransfusionConfig(transformer=cfg, vocab_size=64))
    attention = model.transformer.layers[0].attention
    assert attention.wqkv.weight.shape == ((4 + 2 * 2) * 32, 64) and attention.wo.weight.shape == (64, 4 * 32)
    assert torch.equal(attention.wqkv.bias, torch.zeros(256))
    plain = Transfusion(TransfusionConfig(transformer=TransformerConfig(dim=64, n_heads=4), vocab_size=64))
    # FLOPs' N counts the smaller K/V projections (and the wider heads): per layer, wqkv + wo + biases
    per_layer = (256 * 64 + 256 + 64 * 128) - (3 * 64 * 64 + 64 * 64)
    assert flop_parameters(model) - flop_parameters(plain) == 2 * per_layer
    assert attention_width(cfg) == 4 * 32 and attention_width(plain.cfg.transformer) == 64  # score/value matmuls
    assert TransformerConfig().kv_heads == 4 and TransformerConfig().head_dim == 16  # defaults: today's block
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        TransformerConfig(n_kv_heads=3)
    with pytest.raises(ValueError, match="exclude each other"):
        TransformerConfig(qk_norm=True, qk_rmsnorm=True)
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        TransformerConfig(rope_type="yarn")


@pytest.mark.parametrize("field, value, family", [
    ("sliding_window", 64, "mistral"),
    ("layer_types", ["sliding_attention", "full_attention"], "qwen2"),
    ("attention_bias", True, "qwen3"),
])
def test_refusals_name_the_field(folders, tmp_path, field, value, family):
    config = json.loads((folders[family][0] / "config.json").read_text())
    config = {**config, field: value, "sliding_window": config.get("sliding_window") or 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: {'sliding_window' if field != 'attention_bias' else field}="):
        read_llama_config(tmp_path)


def test_sliding_window_as_long_as_the_context_is_accepted(folders, tmp_path):
    config = json.loads((folders["mistral"][0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": config["max_position_embeddings"]}))
    assert read_llama_config(tmp_path)["architecture"] == "MistralForCausalLM"


def test_save_refuses_a_switch_the_family_lacks(folders, tmp_path):
    model = ours_from(folders["mistral"][0])
    model.cfg.transformer.qk_rmsnorm = True
    with pytest.raises(ValueError, match="qk_rmsnorm=True cannot be saved as MistralForCausalLM"):
        save_llama(model, folders["mistral"][0] / "tokenizer.json", tmp_path)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 4.0},
                                  LLAMA3_ROPE])
def test_rope_frequencies_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(**{**COMMON, "head_dim": 32, "rope_parameters": {"rope_theta": 10_000.0, **rope}})
    expected, attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    assert attention_factor == 1.0
    torch.testing.assert_close(rope_inv_freq(32, 10_000.0, scaling), expected, atol=0, rtol=0)


def test_stored_configs_without_the_new_fields_still_match():
    """A checkpoint's transfusion_config written before these fields: they count as their defaults (today's block);
    a config with them set round-trips through the flat form the checkpoints store."""
    from transfusion.lightning.checkpoint import check_config, flatten_config

    new_fields = ("n_kv_heads", "head_width", "qkv_bias", "qk_rmsnorm", "rope_type", "rope_factor",
                  "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len", "architecture")
    plain = TransfusionConfig(transformer=TransformerConfig.from_name("cpu-small"))
    old = {k: v for k, v in flatten_config(plain).items() if k.removeprefix("transformer.") not in new_fields}
    check_config(old, plain, "an old checkpoint")
    gqa = TransfusionConfig(transformer=TransformerConfig.from_name("cpu-small", n_kv_heads=2, rope_type="llama3",
                                                                    rope_factor=8.0))
    check_config(flatten_config(gqa), gqa, "a new checkpoint")
    with pytest.raises(ValueError, match="transformer.n_kv_heads: checkpoint None != config 2"):
        check_config(old, gqa, "an old checkpoint")


def test_generator_cache_matches_recompute_with_gqa_and_experts(tokenizer_path, autoencoder_ckpt, one_thread):
    """The mixed-modal generator (text, then an image by diffusion) with grouped-query attention, Qwen3's QK-norm,
    q/k/v biases and modality experts: the KV cache (K/V heads only) changes nothing."""
    from transfusion.generation import IMAGE, SamplingOptions, TransfusionGenerator
    from transfusion.lightning.transfusion import TransfusionModule

    torch.manual_seed(0)
    module = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug", modality_experts=True,
                               transformer={"n_kv_heads": 2, "qk_rmsnorm": True, "qkv_bias": True, "head_width": 8})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as test_mot: non-degenerate text and images from an untrained model
        for name, p in module.model.named_parameters():
            if name.startswith(("lm_head", "patch_decoder.proj")) or ".image." in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    model = module.model.double().eval()
    assert model.transformer.layers[0].image.attention.wqkv.weight.shape == ((4 + 2 * 2) * 8, 64)  # MoT: same shapes
    outs = []
    for use_cache in (True, False):
        options = SamplingOptions(num_steps=3, max_new_tokens=4, cfg_scale=3.0, use_cache=use_cache)
        generator = TransfusionGenerator(model, module.autoencoder.model.double(), module.tokenizer, options)
        outs.append(generator.generate([["a large blue square", IMAGE]], seeds=[5], decode=False)[0])
    assert len(outs[0]) == len(outs[1]) and any(isinstance(a, torch.Tensor) for a in outs[0])
    for a, b in zip(*outs):
        if isinstance(a, str):
            assert a == b
        else:
            assert float((a - b).abs().max() / a.abs().max()) < 1e-9


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit internals of the compile
def test_flex_attention_with_gqa_matches_dense_mask():
    """FlexAttention (compiled; forward only on CPU) with enable_gqa equals the dense-mask SDPA path."""
    from test_attention import FB, FDh, FL, flex_batch, flex_or_skip

    from transfusion.models.attention import block_mask

    torch.manual_seed(0)
    _, doc_ids, image_ids, _ = flex_batch()
    q, k, v = (torch.randn(FB, h, FL, FDh) for h in (4, 2, 2))
    out_flex = flex_or_skip(lambda: attend(q, k, v, block_mask(doc_ids, image_ids, block_size=128)))
    out_dense = attend(q, k, v, dense_mask(doc_ids, image_ids))
    torch.testing.assert_close(out_flex, out_dense, rtol=0, atol=1e-5)
    assert out_flex.shape == (FB, 4, FL, FDh)


def test_lmfusion_starts_from_a_llama3_folder_and_exports_it(tmp_path, tokenizer_path, autoencoder_ckpt, one_thread):
    """``text_model`` with grouped-query attention and llama3 RoPE scaling: the module takes the folder's shape (MoT
    image weights of the same shapes, copied from the text ones), text logits equal transformers', and the text
    weights save back as a LlamaForCausalLM folder with the same logits."""
    from test_llama import make_llama

    from transfusion.lightning.transfusion import TransfusionModule

    source = tmp_path / "llama3"
    source.mkdir()
    hf = make_llama(source, tokenizer_path, num_key_value_heads=2, max_position_embeddings=256,
                    rope_parameters={**LLAMA3_ROPE, "rope_theta": 500.0})
    module = TransfusionModule(None, autoencoder_ckpt, text_model=str(source), modality_experts=True)
    assert (module.config.transformer.kv_heads, module.config.transformer.rope_type) == (2, "llama3")
    module.configure_model()
    module._load_text_model(str(source))  # what a fresh fit does first
    params = dict(module.model.named_parameters())
    assert torch.equal(params["transformer.layers.1.image.attention.wqkv.weight"],
                       params["transformer.layers.1.attention.wqkv.weight"])
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    V = hf.config.vocab_size
    with torch.no_grad():
        reference = hf(tokens).logits
    model = module.model.eval()
    torch.testing.assert_close(our_logits(model, tokens)[..., :V], reference, atol=1e-5, rtol=0)

    save_llama(model, module.tokenizer.path, tmp_path / "exported")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits[..., :V], reference, atol=1e-5, rtol=0)


def test_transformers_4_rope_fields_read_the_same(folders, tmp_path):
    """A Llama 3.1 config.json as transformers 4 wrote it (rope_theta and rope_scaling, no rope_parameters)."""
    config = json.loads((folders["llama3"][0] / "config.json").read_text())
    params = config.pop("rope_parameters")
    old = {**config, "rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert read_llama_config(tmp_path) == read_llama_config(folders["llama3"][0])
