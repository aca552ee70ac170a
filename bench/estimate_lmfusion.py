"""Estimates for LMFusion from Llama 3.2 1B or Qwen2.5 0.5B with an SDXL or FLUX VAE at 256 px (docs/scale.md).

The models are built on the meta device (no weights, no memory) from the published ``config.json`` fields below,
through ``transformers``' config classes and ``read_llama_config`` (the mapping ``text_model`` uses), with the
options of ``lightning_configs/lmfusion_llama3.yaml``: modality experts, frozen text weights, U-Net patch layers,
2 x 2 patches of 32 x 32 latents. Printed per model: parameters, training memory per GPU (FSDP2 over 1 or 8 H100s)
and tokens/s from the FLOP formula of ``transfusion/flops.py`` at a stated MFU. Run:

    python bench/estimate_lmfusion.py [--rows_per_gpu 2] [--seq_len 4096] [--caption_tokens 32] [--mfu 0.4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from transfusion._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers imports torchvision

from transfusion.flops import attention_flops, attention_pairs, attention_width, flop_parameters  # noqa: E402
from transfusion.models.llama import read_llama_config  # noqa: E402
from transfusion.models.lmfusion import is_text_weight  # noqa: E402
from transfusion.models.transformer import TransformerConfig, is_image_weight  # noqa: E402
from transfusion.models.transfusion import Transfusion, TransfusionConfig  # noqa: E402

# config.json of https://huggingface.co/meta-llama/Llama-3.2-1B and https://huggingface.co/Qwen/Qwen2.5-0.5B
LLMS = {
    "Llama-3.2-1B": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), 3),  # + PAD, BOI, EOI
    "Qwen2.5-0.5B": ("Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768), 4),  # + PAD, BOI, EOI, BOS
}
# AutoencoderKL configs: stabilityai/sdxl-vae (latent_channels 4), black-forest-labs/FLUX.1-dev vae/ (16);
# both downsample by 8 (4 entries in block_out_channels): 256 px -> 32 x 32 latents
VAES = {"SDXL VAE": 4, "FLUX VAE": 16}
IMAGE_SIZE, DOWNSAMPLE, PATCH = 256, 8, 2
H100_BF16 = 989e12  # dense bf16 FLOP/s of an H100 SXM
GIB = 2**30


def build(llm: str, latent_channels: int) -> Transfusion:
    """The MoT Transfusion that ``text_model`` builds for ``llm``, on the meta device."""
    import transformers

    config_class, fields, appended = LLMS[llm]
    with tempfile.TemporaryDirectory() as folder:
        config = getattr(transformers, config_class)(**fields)
        (Path(folder) / "config.json").write_text(json.dumps(config.to_dict()))
        shape = read_llama_config(folder)
    vocab = shape.pop("vocab_size") + appended
    shape.pop("tie_word_embeddings")  # ours keeps the LM head apart from the embedding (both loaded from it)
    cfg = TransfusionConfig(transformer=TransformerConfig.from_name("debug", **shape, modality_experts=True),
                            vocab_size=vocab, latent_channels=latent_channels, latent_size=IMAGE_SIZE // DOWNSAMPLE,
                            patch_size=PATCH, patch_encoder="unet", unet_channels=256)
    with torch.device("meta"):
        return Transfusion(cfg)


def packed_row(seq_len: int, caption: int, patches: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """doc_ids, image_ids, real (1, L) of a row packed with caption-then-image documents (BOS caption BOI patches
    EOI EOS), and the number of text positions."""
    doc, image, position, k = torch.full((1, seq_len), -1), torch.full((1, seq_len), -1), 0, 0
    length = caption + patches + 4
    while position + length <= seq_len:
        doc[0, position:position + length] = k
        image[0, position + caption + 2:position + caption + 2 + patches] = k
        position, k = position + length, k + 1
    return doc, image, doc >= 0, k * (caption + 4)


def activation_bytes(cfg: TransfusionConfig, tokens: int, text: int, images: int, checkpointing: bool) -> float:
    """Activation memory of one step over ``tokens`` positions (bf16 autocast, fp32 residual stream): per block and
    position the tensors backward keeps (2 norm inputs and the residual in fp32; in bf16 the attention and FFN
    inputs, q/k/v, the attention output, gate, up and their product), the LM head's logits (bf16 and fp32 copies
    and gradient) at text positions, and the U-Net patch layers (~12 feature maps of unet_channels per latent cell
    in the encoder and decoder, bf16). With checkpointing, each block keeps its fp32 input only, and one block's
    activations live at a time."""
    t = cfg.transformer
    kv = t.kv_heads * t.head_dim
    per_block = 3 * 4 * t.dim + 2 * (4 * t.dim + t.n_heads * t.head_dim + 2 * kv + 3 * t.ffn_dim)
    logits = text * cfg.vocab_size * (2 + 4 + 4)
    unet = images * 2 * 12 * cfg.unet_channels * cfg.latent_size**2 * 2
    if checkpointing:
        return tokens * (t.n_layers * 4 * t.dim + per_block) + logits + unet
    return tokens * t.n_layers * per_block + logits + unet


def estimate(llm: str, vae: str, args) -> dict:
    model = build(llm, VAES[vae])
    cfg, t = model.cfg, model.cfg.transformer
    named = {n: p.numel() for n, p in model.named_parameters()}
    text = sum(v for n, v in named.items() if is_text_weight(n))
    image = sum(v for n, v in named.items() if is_image_weight(n))
    patch = sum(v for n, v in named.items() if n.startswith(("patch_encoder.", "patch_decoder.")))
    special = 2 * LLMS[llm][2] * t.dim  # embedding and LM head rows of the appended specials train
    frozen, trained = text - special, image + patch + special
    # FSDP2 gathers a block (text + image weights, fp32) and the next (prefetch), and keeps the root unit
    # (embedding, LM head, patch layers, final norms) gathered through the step
    block = sum(v for n, v in named.items() if n.startswith("transformer.layers.0."))
    root = sum(v for n, v in named.items() if not n.startswith("transformer.layers."))
    patches = cfg.patches_per_image
    doc, img, real, text_positions = packed_row(args.seq_len, args.caption_tokens, patches)
    images = int(img.max()) + 1
    pairs = attention_pairs(doc, img, real, bidirectional=True)
    positions = int(real.sum())
    N = flop_parameters(model)  # body (one modality's weights) + patch layers
    per_position = 6 * N + attention_flops(t.n_layers, attention_width(t), pairs) / positions
    lm_head = 6 * t.dim * cfg.vocab_size * text_positions / positions  # left out of 6N (Kaplan), shown apart
    out = {"model": f"{llm} + {vae}", "text": text, "image": image, "patch": patch, "frozen": frozen,
           "trained": trained, "N": N, "flops_per_position": per_position, "lm_head_flops": lm_head,
           "images_per_row": images, "text_share": text_positions / positions}
    rows = args.rows_per_gpu
    for gpus in (1, 8):
        states = (4 * frozen + 16 * trained) / gpus
        gathered = 4 * (2 * block + root) + 2 * trained  # + autocast's bf16 copies of the trained weights
        for ckpt in (False, True):
            act = activation_bytes(cfg, rows * positions, rows * text_positions, rows * images, ckpt)
            out[f"mem_{gpus}_{'ckpt' if ckpt else 'full'}"] = (states + gathered + act) / GIB
        out[f"states_{gpus}"] = states / GIB
        out[f"tokens_per_s_{gpus}"] = gpus * args.mfu * H100_BF16 / (per_position + lm_head)
        out[f"tokens_per_s_{gpus}_ckpt"] = gpus * args.mfu * H100_BF16 / (per_position * 8 / 6 + lm_head)  # + forward
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows_per_gpu", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--caption_tokens", type=int, default=32)
    parser.add_argument("--mfu", type=float, default=0.4)
    args = parser.parse_args(argv)
    results = [estimate(llm, vae, args) for llm in LLMS for vae in VAES]
    r0 = results[0]
    print(f"Rows of {args.seq_len} positions packed with {r0['images_per_row']} documents of {args.caption_tokens} "
          f"caption tokens + BOS/BOI/EOI/EOS + {IMAGE_SIZE // DOWNSAMPLE // PATCH}^2 patches "
          f"(text {r0['text_share']:.0%} of positions); {args.rows_per_gpu} rows per GPU; "
          f"{args.mfu:.0%} MFU of {H100_BF16 / 1e12:.0f} TFLOP/s.\n")
    m = lambda x: f"{x / 1e6:,.0f}M"  # noqa: E731
    m1 = lambda x: f"{x / 1e6:,.1f}M"  # noqa: E731
    print("| model | text (frozen) | image experts | patch layers | frozen / trained | N (6N) | "
          "GiB/GPU 1 H100: no ckpt / ckpt | 8 H100s: no ckpt / ckpt | GFLOP/position (+ LM head) | "
          "tokens/s 1 H100: no ckpt / ckpt | 8 H100s: no ckpt / ckpt |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {m(r['text'])} | {m(r['image'])} | {m1(r['patch'])} | {m(r['frozen'])} / "
              f"{m(r['trained'])} | {m(r['N'])} | {r['mem_1_full']:.0f} / {r['mem_1_ckpt']:.0f} | "
              f"{r['mem_8_full']:.0f} / {r['mem_8_ckpt']:.0f} | {r['flops_per_position'] / 1e9:.2f} "
              f"(+{r['lm_head_flops'] / 1e9:.2f}) | {r['tokens_per_s_1'] / 1e3:.0f}k / "
              f"{r['tokens_per_s_1_ckpt'] / 1e3:.0f}k | "
              f"{r['tokens_per_s_8'] / 1e3:.0f}k / {r['tokens_per_s_8_ckpt'] / 1e3:.0f}k |")


if __name__ == "__main__":
    main()
