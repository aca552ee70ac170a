"""Generation KV-cache memory with grouped-query attention: the same model with H, H/2 and H/4 key/value heads.

Runs the mixed-modal generator (``TransfusionGenerator``, KV cache on, guidance on) on randomly initialised
``TransfusionModule`` s that differ only in ``n_kv_heads``: a text prompt of P tokens, then an image (``IMAGE``), then
the cache is read. Reported per model: the bytes of the committed keys and values over all layers and rows (what the
cache holds, S positions), the bytes allocated (the buffers grow by doubling), their ratio to multi-head attention,
the K/V projection parameters, and seconds per generated image (the best of ``--repeats``). Assets as in
``bench_generation.py`` (its tokenizer and untrained embedded autoencoder).

    python bench/bench_kv_cache.py                  # cpu-small (4 heads), prompt 256: about a minute on 2 cores
    python bench/bench_kv_cache.py --preset cpu-base --output kv.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_generation.py

import torch  # noqa: E402

from transfusion._torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # before lightning -> torchmetrics -> torchvision

from bench_generation import make_assets, text_of  # noqa: E402


def measure(module, prompt: str, args) -> dict:
    """Generate once with caches recorded; committed and allocated K/V bytes, and the time."""
    import transfusion.generation.base as base
    from transfusion.generation import IMAGE, SamplingOptions, TransfusionGenerator

    recorded, make = [], base.make_caches

    def recording(n_layers):
        recorded.append(make(n_layers))
        return recorded[-1]

    options = SamplingOptions(num_steps=args.num_steps, cfg_scale=args.cfg_scale, max_new_tokens=0)
    generator = TransfusionGenerator(module.model, module.autoencoder.model, module.tokenizer, options)
    base.make_caches = recording
    try:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            generator.generate([[prompt, IMAGE]], seeds=[0], decode=False)
            times.append(time.perf_counter() - start)
    finally:
        base.make_caches = make
    caches = recorded[-1]
    committed = sum(2 * c.k[:, :, :len(c)].numel() * c.k.element_size() for c in caches)
    allocated = sum((c.k.numel() + c.v.numel()) * c.k.element_size() for c in caches)
    cfg = module.config.transformer
    return {"n_heads": cfg.n_heads, "kv_heads": cfg.kv_heads, "rows": caches[0].k.shape[0], "positions": len(caches[0]),
            "cache_shape": list(caches[0].k[:, :, :len(caches[0])].shape), "committed_bytes": committed,
            "allocated_bytes": allocated,
            "kv_projection_params": cfg.n_layers * 2 * cfg.kv_heads * cfg.head_dim * cfg.dim,
            "seconds_per_image": min(times)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--max_seq_len", type=int, default=1024)
    parser.add_argument("--prompt_tokens", type=int, default=256)
    parser.add_argument("--num_steps", type=int, default=4)
    parser.add_argument("--cfg_scale", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transfusion.lightning.transfusion import TransfusionModule
    from transfusion.models.transformer import TransformerConfig

    n_heads = TransformerConfig.from_name(args.preset).n_heads
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer, autoencoder = make_assets(workdir, 2048, seed=0)
        for kv_heads in sorted({n_heads, max(n_heads // 2, 1), max(n_heads // 4, 1)}, reverse=True):
            torch.manual_seed(0)
            module = TransfusionModule(tokenizer, autoencoder, preset=args.preset, transformer={
                "max_seq_len": args.max_seq_len, "n_kv_heads": None if kv_heads == n_heads else kv_heads}).eval()
            rows.append(measure(module, text_of(module.tokenizer, args.prompt_tokens), args))
    mha = rows[0]
    print(f"\n{args.preset}: prompt {args.prompt_tokens} tokens + 1 image, guidance {args.cfg_scale} "
          f"({mha['rows']} rows), {args.num_steps} steps, fp32, {args.threads} threads\n")
    print("| K/V heads / query heads | cache (rows, Hkv, S, Dh) a layer | committed K/V | allocated | MHA / this "
          "| K/V projection params | s / image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["ratio_to_mha"] = mha["committed_bytes"] / r["committed_bytes"]
        print(f"| {r['kv_heads']} / {r['n_heads']} | {tuple(r['cache_shape'])} "
              f"| {r['committed_bytes'] / 2**20:.2f} MiB "
              f"| {r['allocated_bytes'] / 2**20:.2f} MiB | {r['ratio_to_mha']:.2f}x | {r['kv_projection_params']:,} "
              f"| {r['seconds_per_image']:.2f} |")
    results = {"preset": args.preset, "prompt_tokens": args.prompt_tokens, "rows": rows}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
