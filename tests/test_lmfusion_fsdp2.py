"""LMFusion under FSDP2 through the CLI with the shipped YAML (lmfusion_llama3.yaml + trainer_fsdp2.yaml, 2 gloo
processes, a diffusers VAE, streamed shards): a Llama 3 folder written by transformers (grouped-query
attention, llama3 RoPE scaling, tokenizer.json) loads into the sharded model (read on rank 0, broadcast, each rank
keeping its shard) with the text weights bit-identical to the one-device load, and stays so while frozen text
trains its image weights (which start as copies of the text weights) and the special tokens' rows, through a
sharded checkpoint and a resume."""

from pathlib import Path

import pytest
import torch
from shard_writer import write_set
from test_diffusers_vae import make_vae
from test_lmfusion import text_logits
from test_parallel import CONFIGS, _launch

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS, LR, UNET = 3, 3e-3, 16
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # scaling reaches the 64-token rows


def make_llama3(directory):
    """A tiny random Llama 3 (2 of 4 heads for K/V, llama3 RoPE) with a byte-level BPE tokenizer.json."""
    from test_hf_tokenizer import save_hf

    hf_tok = save_hf(directory, ["<|begin_of_text|>", "<|end_of_text|>"], bos_token="<|begin_of_text|>",
                     eos_token="<|end_of_text|>")
    config = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                      max_position_embeddings=256, rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE,
                                      tie_word_embeddings=True)  # as Llama 3.2 1B: the LM head is the embedding
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    return model.eval()


def _yaml_args(root: Path, llama_dir: Path, vae: Path, shards: Path) -> list[str]:
    """The shipped LMFusion YAML and FSDP2 overlay, on 2 CPU processes at a tiny size."""
    return ["--config", str(CONFIGS / "lmfusion_llama3.yaml"), "--config", str(CONFIGS / "trainer_fsdp2.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
            "--trainer.accumulate_grad_batches", "1", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(root), "--trainer.logger.name", "logs",
            "--model.init_args.text_model", str(llama_dir), "--model.init_args.autoencoder.path", str(vae),
            "--model.init_args.autoencoder.image_size", "16", "--model.init_args.unet_channels", str(UNET),
            "--model.init_args.lr", str(LR), "--model.init_args.warmup_steps", "1",
            "--model.init_args.sampling.num_steps", "4",
            "--data.init_args.sources", f"[{{url: {shards / 'train'}, weight: 1.0}}]",
            "--data.init_args.val", str(shards / "validation"), "--data.init_args.seq_len", "64",
            "--data.init_args.batch_size", "4", "--data.init_args.rows_per_epoch", "64",
            "--data.init_args.val_rows", "8", "--data.init_args.num_workers", "0"]


def test_shipped_yaml_loads_the_text_model_sharded_and_keeps_it_frozen(tmp_path):
    from transfusion.lightning.transfusion import TransfusionModule
    from transfusion.models.lmfusion import is_text_weight
    from transfusion.models.transfusion import Transfusion

    llama_dir = tmp_path / "llama3"
    hf = make_llama3(llama_dir)
    V = hf.config.vocab_size
    tokens = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(tokens).logits

    vae = make_vae(tmp_path / "vae")  # a diffusers AutoencoderKL folder: 16 px -> 4 x 8 x 8 latents, 16 patches
    write_set(tmp_path / "shards" / "train", [8, 8, 8, 8])
    write_set(tmp_path / "shards" / "validation", [8])
    first, resumed = tmp_path / "fsdp2", tmp_path / "resumed"
    first.mkdir()
    resumed.mkdir()
    _launch(["fit", *_yaml_args(first, llama_dir, vae, tmp_path / "shards"), "--trainer.max_steps", "2"], first)
    (sharded,) = first.glob("logs/version_*/checkpoints/last.ckpt")
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2  # a sharded checkpoint, one file a rank
    _launch(["fit", *_yaml_args(resumed, llama_dir, vae, tmp_path / "shards"), "--trainer.max_steps", str(STEPS),
             "--trainer.strategy.init_args.save_distributed_checkpoint", "false", "--ckpt_path", str(sharded)],
            resumed)  # resumed from the shards, then one .ckpt file from rank 0
    (ckpt,) = resumed.glob("logs/version_*/checkpoints/last.ckpt")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == STEPS
    trained = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}

    one = TransfusionModule(None, {"path": str(vae), "image_size": 16}, text_model=str(llama_dir),
                            modality_experts=True, patch_encoder="unet", unet_channels=UNET)
    one._load_text_model(str(llama_dir))  # the one-device load
    loaded = one.model.state_dict()
    assert trained.keys() == loaded.keys()
    for name, value in loaded.items():
        if is_text_weight(name):  # frozen under FSDP2: bit for bit the text model's
            rows = V if name in ("embedding.weight", "lm_head.weight") else len(value)
            assert torch.equal(trained[name][:rows], value[:rows]), name
    for name in [n for n in loaded if ".image." in n or "image_norm" in n]:
        # copied from the text weights, then STEPS AdamW steps of at most ~LR each: near the text weights, moved
        text = loaded[name.replace(".image.", ".", 1).replace("image_norm", "norm")]
        assert (trained[name] - text).abs().max() < 1.5 * STEPS * LR, name
        assert not torch.equal(trained[name], text), name
    assert any(not torch.equal(trained[n], loaded[n]) for n in loaded if n.startswith("patch_encoder."))
    initial = Transfusion(one.config)
    initial.init_weights(0)  # what the runs drew (seed_everything: 0) before loading the text model
    for name in ("embedding.weight", "lm_head.weight"):  # PAD, BOI, EOI rows (appended): they train under FSDP2
        start = initial.state_dict()[name][V:]
        assert (trained[name][V:] - start).abs().max() < 1.5 * STEPS * LR, name
        assert (trained[name][V:] != start).any(dim=1).all(), name

    model = TransfusionModule.load_from_checkpoint(ckpt, map_location="cpu").model.eval()
    logits = text_logits(model, tokens)
    torch.testing.assert_close(logits[..., :V], reference, atol=1e-5, rtol=0)  # transformers' Llama 3
    assert torch.equal(logits[..., :V], text_logits(one.model.eval(), tokens)[..., :V])
