"""Hugging Face Llama checkpoints <-> Transfusion (transfusion.models.llama), checked against transformers."""

import json
import shutil

import pytest
import sentencepiece as spm
import torch

from transfusion.models.llama import (llama_to_transfusion, load_llama, read_llama_config, save_llama,
                                      transfusion_to_llama)
from transfusion.models.transformer import TransformerConfig
from transfusion.models.transfusion import Transfusion, TransfusionConfig

transformers = pytest.importorskip("transformers")

PATCH_PREFIXES = ("patch_encoder.", "patch_decoder.")


def make_llama(directory, tokenizer_path, seed=0, **overrides):
    """A small random LlamaForCausalLM (norm weights random too) saved as safetensors, tokenizer beside it."""
    vocab = spm.SentencePieceProcessor(model_file=tokenizer_path).get_piece_size()
    settings = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, intermediate_size=176, max_position_embeddings=128, rms_norm_eps=1e-5,
                    rope_theta=500.0, tie_word_embeddings=False)
    config = transformers.LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="200KB" if overrides else "1GB")
    shutil.copyfile(tokenizer_path, directory / "tokenizer.model")
    return model.eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_path):
    directory = tmp_path_factory.mktemp("llama")
    make_llama(directory, tokenizer_path)
    return directory


def ours_from(config: dict, state: dict) -> Transfusion:
    kwargs = {k: v for k, v in config.items() if k in TransformerConfig.__dataclass_fields__}
    model = Transfusion(TransfusionConfig(transformer=TransformerConfig(**kwargs), vocab_size=config["vocab_size"],
                                          attention="sdpa"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert missing == [k for k in model.state_dict() if k.startswith(PATCH_PREFIXES)] and missing
    return model.eval()


def sequences(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 37), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def our_logits(model: Transfusion, tokens: torch.Tensor) -> torch.Tensor:
    hidden, _ = model(tokens, doc_ids=torch.zeros_like(tokens), image_ids=torch.full_like(tokens, -1))
    return model.lm_head(hidden)


@torch.no_grad()
def hf_logits(directory, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                          dtype=torch.float32).eval()
    return model(tokens).logits


def test_config_maps_llama_fields(llama_dir, tokenizer_path):
    config = read_llama_config(llama_dir)
    vocab = spm.SentencePieceProcessor(model_file=tokenizer_path).get_piece_size()
    assert config == {"n_layers": 2, "dim": 64, "n_heads": 4, "ffn_dim": 176, "norm_eps": 1e-5, "rope_theta": 500.0,
                      "max_seq_len": 128, "vocab_size": vocab, "tie_word_embeddings": False,
                      # a plain Llama: the switches of the newer families keep their defaults
                      "n_kv_heads": None, "head_width": None, "qkv_bias": False, "qk_rmsnorm": False,
                      "rope_type": "default", "architecture": None}
    assert TransformerConfig(**{k: v for k, v in config.items() if k in TransformerConfig.__dataclass_fields__}) \
        == TransformerConfig.from_name("debug", n_layers=2, ffn_dim=176, rope_theta=500.0, max_seq_len=128)


def test_logits_match_hugging_face(llama_dir, one_thread):
    config, state = load_llama(llama_dir)
    assert config["tokenizer_path"] == str(llama_dir / "tokenizer.model")
    model = ours_from(config, state)
    tokens = sequences(config["vocab_size"])
    torch.testing.assert_close(our_logits(model, tokens), hf_logits(llama_dir, tokens), atol=1e-5, rtol=0)


def test_tied_and_sharded_checkpoint(tmp_path, tokenizer_path, one_thread):
    make_llama(tmp_path, tokenizer_path, seed=1, tie_word_embeddings=True)
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    config, state = load_llama(tmp_path)
    assert config["tie_word_embeddings"] and torch.equal(state["lm_head.weight"], state["embedding.weight"])
    tokens = sequences(config["vocab_size"], seed=1)
    torch.testing.assert_close(our_logits(ours_from(config, state), tokens), hf_logits(tmp_path, tokens),
                               atol=1e-5, rtol=0)


def test_round_trip(llama_dir, tmp_path, one_thread):
    config, state = load_llama(llama_dir)
    model = ours_from(config, state)
    save_llama(model, config["tokenizer_path"], tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (llama_dir / "tokenizer.model").read_bytes()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and (saved["bos_token_id"], saved["eos_token_id"]) == (1, 2)

    tokens = sequences(config["vocab_size"], seed=2)
    torch.testing.assert_close(hf_logits(tmp_path, tokens), our_logits(model, tokens), atol=1e-5, rtol=0)
    again, state_again = load_llama(tmp_path)
    assert {k: v for k, v in again.items() if k != "tokenizer_path"} == {
        k: v for k, v in config.items() if k != "tokenizer_path"}
    assert state_again.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(state_again[name], tensor), name


def test_save_keeps_text_weights_only(llama_dir):
    config, state = load_llama(llama_dir)
    model = ours_from(config, state)
    ours = dict(model.state_dict())
    ours["transformer.layers.0.image.attention.wqkv.weight"] = torch.zeros(3)  # Mixture-of-Transformers image weights
    ours["transformer.image_norm.weight"] = torch.zeros(3)
    hf = transfusion_to_llama(ours, n_layers=2)
    assert all(name.startswith(("model.", "lm_head.")) for name in hf) and len(hf) == 3 + 2 * 9
    assert all(t.is_contiguous() for t in hf.values())
    text = {k for k in model.state_dict() if not k.startswith(PATCH_PREFIXES)}
    assert set(llama_to_transfusion(hf, 2, False)) == text
    with pytest.raises(ValueError, match=r"unexpected \['transformer.layers.0.attention.q_norm.weight'\]"):
        transfusion_to_llama({**ours, "transformer.layers.0.attention.q_norm.weight": torch.ones(16)}, 2)


def test_save_refuses_chameleon_switches(tmp_path, tokenizer_path):
    model = Transfusion(TransfusionConfig(transformer=TransformerConfig(norm_reorder=True), vocab_size=64))
    with pytest.raises(ValueError, match="norm_reorder"):
        save_llama(model, tokenizer_path, tmp_path)


def test_missing_and_unexpected_tensors_named(llama_dir):
    hf = transfusion_to_llama(ours_from(*load_llama(llama_dir)).state_dict(), 2)
    del hf["model.layers.1.mlp.up_proj.weight"]
    hf["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\], "
                                         r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]"):
        llama_to_transfusion(hf, 2, False)


@pytest.mark.parametrize("field, value", [
    ("num_key_value_heads", 3),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 500.0, "factor": 8.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}),  # no low/high_freq_factor
    ("partial_rotary_factor", 0.5),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("hidden_act", "gelu"),
    ("model_type", "gemma"),
    ("architectures", ["LlamaModel"]),
    ("architectures", ["MistralForCausalLM"]),
])
def test_refusals_name_the_field(llama_dir, tmp_path, field, value):
    config = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=f"config.json: {field}="):
        read_llama_config(tmp_path)


def test_tokenizer_required(llama_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(llama_dir / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_llama(tmp_path)
