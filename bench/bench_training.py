"""Training throughput on CPU: tokens/s, MFU and peak RSS, ours next to transfusion-pytorch in one run.

A training step is forward + backward + AdamW step on rows of L positions (text tokens, and per image BOI,
16 latent patches, EOI) with randomly initialised weights and random data (speed does not depend on them).
The reference (``pip install -e ".[bench]"``: lucidrains' ``transfusion-pytorch``) is built at the same width,
depth, heads, FFN width, vocabulary and latent shape (8x8x4 latents as 4x4 patches of 16 values) and gets the
same rows as lists of text and latent tensors; its extras are off where its API allows (``qk_rmsnorm``,
value gates, value residual, laser attention, dropout); its adaptive-norm time conditioning, U-Net skips and
attention soft-capping cannot be turned off (``unet_skips=False`` fails an assertion in 0.20.0).

MFU: model FLOPs of the shared architecture (6 x matmul parameters + 12 x layers x width x L per token,
attention over all L) over the CPU's matmul peak measured at the start of the run, for both implementations,
so the MFU ratio equals the tokens/s ratio. Peak RSS: the process's high-water mark reset before each
configuration (``malloc_trim``, ``/proc/self/clear_refs``), so it covers the process's baseline (torch, ~0.3 GB),
one model, its optimizer state and its steps.

    python bench/bench_training.py                    # about 8 minutes on 2 idle CPU cores
    python bench/bench_training.py --steps 1 --sections compare --output train.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md

import torch  # noqa: E402

from transfusion._torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # before anything imports torchvision

from transfusion.models.transformer import TransformerConfig  # noqa: E402
from transfusion.models.transfusion import Transfusion, TransfusionConfig  # noqa: E402

VOCAB, CHANNELS, LATENT, PATCH = 2048, 4, 8, 2
N_PATCHES = (LATENT // PATCH) ** 2  # 16
BOI, EOI = 4, 5


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 4) -> float:
    """Best FLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def segments(L: int, images: int) -> list[int]:
    """Text lengths between images so that texts + images x (BOI + 16 patches + EOI) = L."""
    text = L - images * (N_PATCHES + 2)
    if text < images + 1:
        raise ValueError(f"{images} images do not fit in L={L}")
    return [text // (images + 1) + (1 if i < text % (images + 1) else 0) for i in range(images + 1)]


def model_flops_per_token(cfg: TransformerConfig, L: int) -> float:
    D, F = cfg.dim, cfg.ffn_dim
    matmul_params = cfg.n_layers * (4 * D * D + 3 * D * F) + D * VOCAB  # blocks + LM head
    return 6 * matmul_params + 12 * cfg.n_layers * D * L


def ours(cfg: TransformerConfig, L: int, images: int, rows: int):
    model = Transfusion(TransfusionConfig(transformer=cfg, vocab_size=VOCAB, latent_channels=CHANNELS,
                                          latent_size=LATENT, patch_size=PATCH))
    tokens, image_ids = torch.randint(6, VOCAB, (rows, L)), torch.full((rows, L), -1)
    for r in range(rows):
        pos = 0
        for i, text in enumerate(segments(L, images)):
            pos += text
            if i < images:
                tokens[r, pos], tokens[r, pos + N_PATCHES + 1] = BOI, EOI
                image_ids[r, pos + 1:pos + 1 + N_PATCHES] = r * images + i
                pos += N_PATCHES + 2
    doc_ids, latents = torch.zeros(rows, L, dtype=torch.long), torch.randn(rows * images, CHANNELS, LATENT, LATENT)
    return model, lambda: model.loss(tokens, doc_ids, image_ids, latents, boi_id=BOI)["loss"]


def reference(cfg: TransformerConfig, L: int, images: int, rows: int):
    from transfusion_pytorch import Transfusion as Reference

    model = Reference(
        num_text_tokens=VOCAB, dim_latent=CHANNELS * PATCH**2, modality_default_shape=(LATENT // PATCH,) * 2,
        transformer=dict(dim=cfg.dim, depth=cfg.n_layers, heads=cfg.n_heads, dim_head=cfg.head_dim,
                         ff_expansion_factor=cfg.ffn_dim * 1.5 / cfg.dim, qk_rmsnorm=False,
                         use_value_residual=False, attn_laser=False, dropout=0.0,
                         attn_kwargs=dict(gate_values=False)))
    batch = []
    for _ in range(rows):  # it adds its own begin/end-of-image tokens around each latent
        row = []
        for i, text in enumerate(segments(L, images)):
            row.append(torch.randint(0, VOCAB, (text,)))
            if i < images:
                row.append(torch.randn(LATENT // PATCH, LATENT // PATCH, CHANNELS * PATCH**2))
        batch.append(row)
    return model, lambda: model(batch)


def _reset_peak_rss() -> None:
    """Return freed heap to the OS (glibc keeps it otherwise), then restart the high-water mark from here."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def measure(build, cfg, L, images, rows, dtype, steps, warmup) -> dict:
    gc.collect()
    _reset_peak_rss()
    model, loss_fn = build(cfg, L, images, rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    result = {"s_per_step": seconds, "tokens_per_s": rows * L / seconds, "peak_rss_mb": _peak_rss_mb(),
              "params": sum(p.numel() for p in model.parameters())}
    del model, optimizer, loss_fn
    return result


def profile(build, cfg, L, images, rows, top: int = 12) -> str:
    model, loss_fn = build(cfg, L, images, rows)
    loss_fn().backward()
    with torch.profiler.profile() as prof:
        loss_fn().backward()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", type=int, default=1, help="rows per batch")
    parser.add_argument("--sections", default="compare,length,images",
                        help="comma-separated: compare (presets x fp32/bf16), length (512..4096), images")
    parser.add_argument("--presets", default="cpu-small,cpu-base")
    parser.add_argument("--dtypes", default="fp32,bf16", help="bf16: autocast; skipped where the CPU has no native bf16")
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--reference_max_len", type=int, default=4096, help="skip the reference above this L")
    parser.add_argument("--no_reference", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print both implementations' top ops (cpu-small, L=1024)")
    parser.add_argument("--output", default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    has_reference = not args.no_reference
    if has_reference:
        try:
            import transfusion_pytorch  # noqa: F401
        except ImportError:
            print("transfusion-pytorch is not installed (pip install -e '.[bench]'): measuring ours only")
            has_reference = False

    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16, n=512, reps=2)}
    dtypes = args.dtypes.split(",")
    if "bf16" in dtypes and peak["bf16"] < peak["fp32"] / 4:  # no native bf16 (e.g. AVX2 only): emulated, useless
        print(f"bf16 matmul runs at {peak['bf16'] / 1e9:.1f} GFLOP/s on this CPU ({peak['fp32'] / 1e9:.0f} in fp32): "
              "no native bf16, bf16 rows skipped")
        dtypes.remove("bf16")
    elif "bf16" in dtypes:
        peak["bf16"] = matmul_peak(torch.bfloat16)
    print(f"# Training throughput, {args.threads} threads, torch {torch.__version__}, {args.rows} row(s) a step, "
          f"{args.steps} timed step(s) after {args.warmup}")
    print(f"matmul peak (2048^3): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s\n")
    results = {"peak_flops": peak, "config": vars(args), "runs": []}
    print("(absolute figures vary with load; compare the ratios, measured side by side)\n", flush=True)

    def run(section, preset, L, images, dtype):
        cfg = TransformerConfig.from_name(preset, max_seq_len=L)
        flops = model_flops_per_token(cfg, L)
        entry = {"section": section, "preset": preset, "L": L, "images": images, "dtype": dtype,
                 "width": cfg.dim, "depth": cfg.n_layers, "heads": cfg.n_heads, "ffn": cfg.ffn_dim}
        for name, build in [("ours", ours), ("reference", reference)]:
            if name == "reference" and (not has_reference or L > args.reference_max_len):
                continue
            r = measure(build, cfg, L, images, args.rows, dtype, args.steps, args.warmup)
            r["mfu"] = r["tokens_per_s"] * flops / peak[dtype]
            entry[name] = r
        entry["ratio"] = entry["ours"]["tokens_per_s"] / entry["reference"]["tokens_per_s"] if "reference" in entry else None
        results["runs"].append(entry)
        ref = entry.get("reference")
        cells = [preset, str(L), str(images), dtype, f"{entry['ours']['tokens_per_s']:.0f}",
                 f"{ref['tokens_per_s']:.0f}" if ref else "-", f"{entry['ratio']:.2f}x" if ref else "-",
                 f"{100 * entry['ours']['mfu']:.1f}%", f"{100 * ref['mfu']:.1f}%" if ref else "-",
                 f"{entry['ours']['peak_rss_mb']:.0f}", f"{ref['peak_rss_mb']:.0f}" if ref else "-"]
        print("| " + " | ".join(cells) + " |", flush=True)

    header = ("| preset | L | images | dtype | ours tok/s | reference tok/s | ours / reference | ours MFU | "
              "reference MFU | ours peak RSS MB | reference peak RSS MB |\n|" + "---|" * 11)
    sections = args.sections.split(",")
    if "compare" in sections:
        print("## ours vs transfusion-pytorch: presets, fp32 and bf16 (L=1024, 4 images a row)\n\n" + header)
        for preset in args.presets.split(","):
            for dtype in dtypes:
                run("compare", preset, 1024, 4, dtype)
    if "length" in sections:
        print("\n## sequence length (cpu-small, fp32, one image per 256 positions)\n\n" + header)
        for L in map(int, args.lengths.split(",")):
            run("length", "cpu-small", L, L // 256, "fp32")
    if "images" in sections:
        print("\n## images per row (cpu-small, fp32, L=1024)\n\n" + header)
        for images in (1, 4, 16, 32):
            run("images", "cpu-small", 1024, images, "fp32")
    for preset in args.presets.split(","):
        cfg = TransformerConfig.from_name(preset)
        print(f"\n{preset}: width {cfg.dim}, depth {cfg.n_layers}, heads {cfg.n_heads} (head width {cfg.head_dim}), "
              f"FFN {cfg.ffn_dim} (SwiGLU; reference GEGLU of the same width), vocabulary {VOCAB}, "
              f"latent {CHANNELS}x{LATENT}x{LATENT} as {N_PATCHES} patches of {CHANNELS * PATCH ** 2}")
    if args.profile:
        cfg = TransformerConfig.from_name("cpu-small", max_seq_len=1024)
        for name, build in [("ours", ours), ("reference", reference)][: 2 if has_reference else 1]:
            print(f"\n## profile: {name}, cpu-small, L=1024, 4 images, fp32 (forward + backward)\n")
            print(profile(build, cfg, 1024, 4, args.rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
