"""Generation speed: the prefix KV cache against full recomputation, text tokens/s, images/s by batch size, and
time per image against transfusion-pytorch.

Everything runs in one process on a randomly initialised ``TransfusionModule`` (speed does not depend on
the weights); the script makes its own tokenizer and an untrained "embedded" autoencoder checkpoint
(32px -> 8x8x4 latents, patch 2 -> 16 patches per image) in a temporary directory.

    python bench/bench_generation.py                       # cpu-small, max_seq_len 1024: about 40 s on 2 cores
    python bench/bench_generation.py --output bench.json   # also write the numbers as JSON

Measured:

* image generation for a text prompt of P tokens + ``IMAGE`` (P = 32 and 512) with the cache and with full
  recomputation: total time and the cost of one denoising step (a run's median step; timed around the
  sampler's noise-prediction call, so it includes the mask, the model and guidance). Ratios: cached-512 /
  cached-32 per step (target <= 1.2: a step's cost should barely grow with the prefix, guidance rows included)
  and recompute-512 / cached-512 per step (target >= 3);
* text tokens/s with and without the cache (N new tokens after a P-token prompt; EOS and BOI are
  suppressed so that exactly N tokens are generated), and the cached milliseconds a token (target <= 2);
* images/s for a batch of 1 and of 8 captions (cached, decoded to pixels, guidance on);
* seconds per image against transfusion-pytorch (``pip install -e ".[bench]"``; ``--no_reference`` skips it):
  the same width, depth, heads, FFN width, vocabulary and latent shape, a prompt of the same length, guidance
  on, both with their KV caches, and the same number of noise predictions (its midpoint ODE solver makes two
  per interval: counted in the run, and ours runs that many DDPM steps).

Configurations are run in interleaved rounds after a warm-up, and each number is the best of ``--repeats``
rounds (the JSON also has medians): on a machine shared with other work, noise only ever adds time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager

# Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads that wait for a core
# another process holds can slow a multi-threaded run tens of times. Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from transfusion._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before lightning -> torchmetrics -> torchvision

WORDS = ("red", "blue", "circle", "square", "the", "a", "green", "top", "left", "small")


# ---------------------------------------------------------------------------------------- setup

def make_assets(workdir: str, vocab_size: int, seed: int) -> tuple[str, str]:
    """A tokenizer and an (essentially untrained) embedded autoencoder checkpoint."""
    import lightning as L
    from torch.utils.data import DataLoader

    from transfusion.cli import tokenizer_main
    from transfusion.data.embedded.shapes import ShapesDataset
    from transfusion.lightning.autoencoder import AutoencoderModule

    tokenizer = os.path.join(workdir, "tokenizer.model")
    tokenizer_main(["--output", tokenizer, "--vocab_size", str(vocab_size)])
    L.seed_everything(seed, verbose=False)
    autoencoder = AutoencoderModule(preset="embedded")
    data = ShapesDataset(8, autoencoder.config.image_size, seed=seed)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=workdir)
    trainer.fit(autoencoder, DataLoader(images, batch_size=8))  # one step: sets latent_std, writes a real checkpoint
    checkpoint = os.path.join(workdir, "autoencoder.ckpt")
    trainer.save_checkpoint(checkpoint)
    return tokenizer, checkpoint


def build_module(tokenizer: str, autoencoder: str, preset: str, max_seq_len: int, seed: int):
    from transfusion.lightning.transfusion import TransfusionModule

    torch.manual_seed(seed)
    module = TransfusionModule(tokenizer, autoencoder, preset=preset, transformer={"max_seq_len": max_seq_len})
    with torch.no_grad():  # the patch decoder starts at zero; give it weights so eps depends on the input
        nn.init.normal_(module.model.patch_decoder.proj.weight, std=0.02)
    return module.eval()


def text_of(tokenizer, n_tokens: int) -> str:
    """A text that encodes to exactly ``n_tokens`` tokens."""
    words = [WORDS[i % len(WORDS)] for i in range(n_tokens)]
    text = " ".join(words)
    while len(tokenizer.encode(text)) > n_tokens:
        words.pop()
        text = " ".join(words)
    while len(tokenizer.encode(text)) < n_tokens:
        text += " red"
    if len(tokenizer.encode(text)) != n_tokens:
        raise RuntimeError(f"could not build a prompt of exactly {n_tokens} tokens")
    return text


@contextmanager
def suppress_tokens(module, token_ids):
    """LM head with a -1e4 bias on ``token_ids`` (so text generation runs to its budget)."""
    original = module.model.lm_head
    head = nn.Linear(original.in_features, original.out_features, bias=True).to(original.weight)
    with torch.no_grad():
        head.weight.copy_(original.weight)
        head.bias.zero_()
        head.bias[list(token_ids)] = -1e4
    module.model.lm_head = head
    try:
        yield
    finally:
        module.model.lm_head = original


# ---------------------------------------------------------------------------------------- timing

@contextmanager
def step_timer(module, times: list[float]):
    """Time every call of the sampler's noise-prediction function (one denoising step of the batch)."""
    schedule = module.model.schedule
    sample = type(schedule).sample

    def timed_sample(denoiser, *args, **kwargs):
        def timed(x, t):
            start = time.perf_counter()
            out = denoiser(x, t)
            times.append(time.perf_counter() - start)
            return out

        return sample(schedule, timed, *args, **kwargs)

    schedule.sample = timed_sample
    try:
        yield
    finally:
        del schedule.sample


@contextmanager
def call_timer(module, calls: list[tuple[int, float]]):
    """(new positions, seconds) of every forward call of the model."""
    starts = []

    def pre(_, args):
        starts.append(time.perf_counter())

    def post(_, args, output):
        calls.append((args[0].shape[1], time.perf_counter() - starts.pop()))

    handles = [module.model.register_forward_pre_hook(pre), module.model.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run(module, prompts, options, seeds, decode=False) -> dict:
    """One generation: wall time, the time of each denoising step and of each model call, the outputs."""
    from transfusion.generation import TransfusionGenerator

    steps, calls = [], []
    generator = TransfusionGenerator(module.model, module.autoencoder.model, module.tokenizer, options)
    with step_timer(module, steps), call_timer(module, calls):
        start = time.perf_counter()
        out = generator.generate(prompts, seeds=seeds, decode=decode)
        total = time.perf_counter() - start
    return {"total": total, "steps": steps, "calls": calls, "out": out}


def interleaved(jobs: dict, repeats: int) -> dict:
    """Run every job once as a warm-up, then ``repeats`` rounds of all jobs in turn (so that a burst of
    load from other processes hits all configurations alike); returns each job's list of runs."""
    for job in jobs.values():
        job(warmup=True)
    runs = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, job in jobs.items():
            runs[key].append(job(warmup=False))
    return runs


def best(values) -> float:
    """Best of the repeats: on a shared machine noise only ever adds time."""
    return min(values)


def bench_image_prefix(module, args) -> list[dict]:
    from transfusion.generation import IMAGE, SamplingOptions

    def job(length, use_cache):
        prompt = [text_of(module.tokenizer, length), IMAGE]
        options = SamplingOptions(max_new_tokens=0, cfg_scale=args.cfg_scale, num_steps=args.num_steps,
                                  sampler=args.sampler, use_cache=use_cache)
        warm = SamplingOptions(**{**options.__dict__, "num_steps": 2})
        return lambda warmup: run(module, [prompt], warm if warmup else options, [0])

    runs = interleaved({(n, c): job(n, c) for n in args.prompt_lengths for c in (True, False)}, args.repeats)
    rows = []
    for (length, use_cache), rs in runs.items():
        cached, recomputed = runs[length, True][-1]["out"][0][0], runs[length, False][-1]["out"][0][0]
        rows.append({"prompt_tokens": length, "positions": length + 2, "cache": use_cache, "steps": args.num_steps,
                     "total_s": best(r["total"] for r in rs),
                     "step_ms": 1e3 * best(statistics.median(r["steps"]) for r in rs),
                     "total_s_median": statistics.median(r["total"] for r in rs),
                     "step_ms_median": 1e3 * statistics.median(s for r in rs for s in r["steps"]),
                     "latent_rel_diff": float((cached - recomputed).abs().max() / cached.abs().max())})
    return rows


def bench_text(module, args) -> list[dict]:
    from transfusion.generation import SamplingOptions

    tok = module.tokenizer
    prompt = text_of(tok, args.text_prompt_tokens)

    def job(use_cache):
        options = SamplingOptions(max_new_tokens=args.text_new_tokens, cfg_scale=1.0, use_cache=use_cache)
        warm = SamplingOptions(**{**options.__dict__, "max_new_tokens": 4})
        return lambda warmup: run(module, [prompt], warm if warmup else options, [0])

    with suppress_tokens(module, [tok.eos_id, tok.boi_id]):
        runs = interleaved({c: job(c) for c in (True, False)}, args.repeats)
    rows = []
    for use_cache, rs in runs.items():
        n_tokens = len(rs[0]["calls"]) - 1  # the prefill, then one call per generated token
        total, prefill = best(r["total"] for r in rs), best(r["calls"][0][1] for r in rs)
        decode = best(r["total"] - r["calls"][0][1] for r in rs)
        rows.append({"cache": use_cache, "prompt_tokens": args.text_prompt_tokens, "new_tokens": n_tokens,
                     "total_s": total, "prefill_s": prefill, "tokens_per_s": n_tokens / total,
                     "decode_tokens_per_s": n_tokens / decode,
                     "same_text": runs[True][-1]["out"] == runs[False][-1]["out"]})
    return rows


def bench_batch(module, args) -> list[dict]:
    from transfusion.generation import IMAGE, SamplingOptions

    caption = text_of(module.tokenizer, args.batch_prompt_tokens)
    options = SamplingOptions(max_new_tokens=0, cfg_scale=args.cfg_scale, num_steps=args.num_steps,
                              sampler=args.sampler, use_cache=True)
    warm = SamplingOptions(**{**options.__dict__, "num_steps": 2})

    def job(batch):
        prompts, seeds = [[caption, IMAGE]] * batch, list(range(batch))
        return lambda warmup: run(module, prompts, warm if warmup else options, seeds, decode=True)

    runs = interleaved({b: job(b) for b in args.batch_sizes}, args.repeats)
    rows = []
    for batch, rs in runs.items():
        total = best(r["total"] for r in rs)
        rows.append({"batch": batch, "total_s": total, "images_per_s": batch / total,
                     "step_ms": 1e3 * best(statistics.median(r["steps"]) for r in rs)})
    return rows


def reference_model(module):
    """transfusion-pytorch at our width, depth, heads, FFN width, vocabulary and latent shape (its extras off
    where its API allows, as in ``bench_training.py``), or None when it is not installed."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # its sampler's progress bar
    try:
        from transfusion_pytorch import Transfusion as Reference
    except ImportError:
        return None
    cfg, t = module.config, module.config.transformer
    torch.manual_seed(0)
    return Reference(
        num_text_tokens=cfg.vocab_size, dim_latent=cfg.latent_channels * cfg.patch_size**2,
        modality_default_shape=(cfg.latent_size // cfg.patch_size,) * 2,
        transformer=dict(dim=t.dim, depth=t.n_layers, heads=t.n_heads, dim_head=t.head_dim,
                         ff_expansion_factor=t.ffn_dim * 1.5 / t.dim, qk_rmsnorm=False, use_value_residual=False,
                         attn_laser=False, dropout=0.0, attn_kwargs=dict(gate_values=False))).eval()


def bench_reference(module, args) -> dict | None:
    """Time per image against transfusion-pytorch: same network shape, same prompt length, guidance on, the same
    number of noise predictions (its midpoint ODE solver makes 2 per interval; we count them and run that many
    DDPM steps), both with their KV caches, batch 1, latents only (no decoding)."""
    from transfusion.generation import IMAGE, SamplingOptions

    reference = reference_model(module)
    if reference is None:
        print("transfusion-pytorch is not installed (pip install -e '.[bench]'): no side-by-side")
        return None
    evaluations = []
    solver = reference.odeint_fn

    def counting_solver(fn, *a, **kw):  # count its noise (flow) predictions, each one cond + uncond forward
        def counted(*x):
            evaluations.append(1)
            return fn(*x)
        return solver(counted, *a, **kw)

    reference.odeint_fn = counting_solver
    caption = text_of(module.tokenizer, args.reference_prompt_tokens)
    ids = torch.randint(0, module.config.vocab_size, (args.reference_prompt_tokens,))

    def theirs(steps):
        def job(warmup):
            evaluations.clear()
            start = time.perf_counter()
            with torch.no_grad():
                out = reference.sample(prompt=ids, force_modality_at_start=0, max_length=0, cache_kv=True,
                                       modality_steps=2 if warmup else steps, cfg_scale=args.cfg_scale)
            return {"total": time.perf_counter() - start, "evaluations": len(evaluations), "out": out}
        return job

    probe = theirs(args.reference_steps)(warmup=False)  # how many noise predictions its solver makes
    nfe = probe["evaluations"]
    options = SamplingOptions(max_new_tokens=0, cfg_scale=args.cfg_scale, num_steps=nfe, sampler=args.sampler)
    warm = SamplingOptions(**{**options.__dict__, "num_steps": 2})
    jobs = {"ours": lambda warmup: run(module, [[caption, IMAGE]], warm if warmup else options, [0]),
            "transfusion-pytorch": theirs(args.reference_steps)}
    runs = interleaved(jobs, args.repeats)
    ours, ref = best(r["total"] for r in runs["ours"]), best(r["total"] for r in runs["transfusion-pytorch"])
    return {"prompt_tokens": args.reference_prompt_tokens, "evaluations": nfe, "reference_modality_steps": args.reference_steps,
            "ours_s": ours, "reference_s": ref, "ratio": ref / ours,
            "ours_parameters": sum(p.numel() for p in module.model.parameters()),
            "reference_parameters": sum(p.numel() for p in reference.parameters())}


def decode_target(text_rows: list[dict]) -> dict:
    cached = next(r for r in text_rows if r["cache"])
    ms = 1e3 / cached["decode_tokens_per_s"]
    return {"name": "cached text decode, ms a token", "value": ms, "target": "<= 2 ms", "met": ms <= 2.0}


# ---------------------------------------------------------------------------------------- report

def markdown(results: dict) -> str:
    a = results["args"]
    lines = [f"Model: {a['preset']} (max_seq_len {a['max_seq_len']}), {results['parameters'] / 1e6:.1f}M parameters, "
             f"{results['patches_per_image']} patches per image, cfg_scale {a['cfg_scale']}, {a['sampler']} "
             f"{a['num_steps']} steps, float32, {a['threads']} threads, {results['machine']}; "
             f"best of {a['repeats']} runs", ""]
    lines += ["| image generation | prompt tokens | total (s) | per step (ms) | cache vs recompute (max rel diff) |",
              "|---|---:|---:|---:|---:|"]
    for r in results["image_prefix"]:
        lines.append(f"| {'KV cache' if r['cache'] else 'recompute'} | {r['prompt_tokens']} | {r['total_s']:.2f} | "
                     f"{r['step_ms']:.1f} | {r['latent_rel_diff']:.1e} |")
    lines += ["", "| ratio | per step | total | target |", "|---|---:|---:|---|"]
    for r in results["ratios"]:
        ok = "met" if r["met"] else "MISSED"
        lines.append(f"| {r['name']} | {r['per_step']:.2f}x | {r['total']:.2f}x | {r['target']} ({ok}) |")
    lines += ["", "| text | prompt tokens | new tokens | total (s) | prefill (s) | tokens/s | decode tokens/s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["text"]:
        lines.append(f"| {'KV cache' if r['cache'] else 'recompute'} | {r['prompt_tokens']} | {r['new_tokens']} | "
                     f"{r['total_s']:.2f} | {r['prefill_s']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} |")
    d = results["decode"]
    lines.append(f"\nText identical with and without the cache: {results['text'][0]['same_text']}; "
                 f"{d['name']}: {d['value']:.2f} ({d['target']}: {'met' if d['met'] else 'MISSED'})")
    lines += ["", "| batch (KV cache, decoded) | total (s) | per step (ms) | images/s |", "|---:|---:|---:|---:|"]
    for r in results["batch"]:
        lines.append(f"| {r['batch']} | {r['total_s']:.2f} | {r['step_ms']:.1f} | {r['images_per_s']:.2f} |")
    ref = results.get("reference")
    if ref:
        lines += ["", f"| one image, {ref['prompt_tokens']}-token prompt, guidance {a['cfg_scale']}, "
                      f"{ref['evaluations']} noise predictions, KV caches | s per image | parameters |",
                  "|---|---:|---:|",
                  f"| ours (DDPM, {ref['evaluations']} steps) | {ref['ours_s']:.3f} | {ref['ours_parameters'] / 1e6:.1f}M |",
                  f"| transfusion-pytorch (midpoint ODE, {ref['reference_modality_steps']} times) | "
                  f"{ref['reference_s']:.3f} | {ref['reference_parameters'] / 1e6:.1f}M |",
                  f"| ours faster by | {ref['ratio']:.1f}x | |"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--max_seq_len", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--prompt_lengths", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--num_steps", type=int, default=20)
    parser.add_argument("--cfg_scale", type=float, default=5.0)
    parser.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    parser.add_argument("--text_prompt_tokens", type=int, default=128)
    parser.add_argument("--text_new_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch_prompt_tokens", type=int, default=16)
    parser.add_argument("--reference_prompt_tokens", type=int, default=32)
    parser.add_argument("--reference_steps", type=int, default=11,
                        help="transfusion-pytorch's modality_steps (ODE times; midpoint: 2 noise predictions an interval)")
    parser.add_argument("--no_reference", action="store_true", help="skip the side-by-side with transfusion-pytorch")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the best is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None,
                        help="where to write the tokenizer and autoencoder (default: a temporary directory)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        tokenizer, autoencoder = make_assets(workdir, args.vocab_size, args.seed)
        module = build_module(tokenizer, autoencoder, args.preset, args.max_seq_len, args.seed)
        setup_s = time.perf_counter() - started
        image_prefix = bench_image_prefix(module, args)
        text = bench_text(module, args)
        batch = bench_batch(module, args)
        reference = None if args.no_reference else bench_reference(module, args)

    def row(length, cache):
        return next(r for r in image_prefix if r["prompt_tokens"] == length and r["cache"] == cache)

    lo, hi = min(args.prompt_lengths), max(args.prompt_lengths)
    ratios = [
        {"name": f"cached {hi} / cached {lo}", "per_step": row(hi, True)["step_ms"] / row(lo, True)["step_ms"],
         "total": row(hi, True)["total_s"] / row(lo, True)["total_s"], "target": "<= 1.2x"},
        {"name": f"recompute {hi} / cached {hi}", "per_step": row(hi, False)["step_ms"] / row(hi, True)["step_ms"],
         "total": row(hi, False)["total_s"] / row(hi, True)["total_s"], "target": ">= 3x"},
    ]
    ratios[0]["met"], ratios[1]["met"] = ratios[0]["per_step"] <= 1.2, ratios[1]["per_step"] >= 3.0
    results = {
        "args": vars(args), "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "patches_per_image": module.config.patches_per_image, "setup_s": setup_s,
        "image_prefix": image_prefix, "ratios": ratios, "text": text, "decode": decode_target(text), "batch": batch,
        "reference": reference,
        "elapsed_s": time.perf_counter() - started,
    }
    print(markdown(results))
    print(f"\n(setup {setup_s:.0f} s, total {results['elapsed_s']:.0f} s)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
