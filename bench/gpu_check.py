"""GPU readiness in one command: attention kernels, bf16 training, generation and the quickstart on CUDA.

    python bench/gpu_check.py                         # one H100-class GPU: about 6 minutes; Markdown table + JSON
    python bench/gpu_check.py --dry                   # tiny sizes in seconds (automatic without CUDA; in the tests)
    python bench/gpu_check.py --dry --device cuda     # the same tiny run on the GPU: a quick smoke check first
    python bench/gpu_check.py --sections attention,training --output gpu.json

Sections (each runs even if an earlier one failed; a failure is a FAIL row with its error, the JSON has the
traceback, and the exit status is 1):

1. ``attention``: compiled FlexAttention (the GPU path, ``block_mask``) and dense-mask SDPA (the CPU path,
   ``dense_mask``) on one packed batch (4 documents a row, 2 images of 256 patches each, a padded tail),
   forward and backward, fp32 and bf16; both against float64 SDPA on the same inputs. Error = max |x - ref| /
   max |ref| over the output and the gradients of q, k and v; tolerances 1e-4 (fp32), 5e-2 (bf16). Times are
   the median forward and forward + backward milliseconds. (No FlexAttention backward exists on CPU.) On CUDA,
   both again with grouped-query attention (``enable_gqa``: H / 4 K/V heads against the float64 reference over
   them repeated to H).
2. ``training``: ``TransfusionModule`` under a Lightning ``Trainer`` with ``precision="bf16-mixed"`` on rows of
   4096 positions laid out as above (the paper's 32x32x8 latents, patch 2): the 0.16B preset without and with
   ``compile`` (each block), and the 0.37B preset under ``FSDP2Strategy`` on one device. Median step time after
   warm-up -> tokens/s; MFU = the module's own FLOP count (6 N D + attention pairs, ``transfusion.flops``) per
   second over the dense bf16 matmul peak measured at the start of the run (8192^3); peak GPU memory.
   Target: MFU >= 40% at 0.16B.
3. ``generation``: the 0.16B preset with the paper's autoencoder shape (random weights: speed does not depend
   on them): images/s at batch 1 and 32 (guidance 5, 250 DDPM steps, decoded to pixels); text tokens/s
   (one prompt, KV cache); and in float64 cache == recompute for a batch of a caption -> image -> text prompt
   and an image -> text prompt, with guidance (same text, latents to 1e-9 relative).
4. ``quickstart``: ``transfusion quickstart --accelerator gpu`` (the committed embedded recipe) in a
   subprocess: its wall time per stage and how its generations follow their prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from transfusion._torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # before lightning -> torchmetrics -> torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import build_module, suppress_tokens, text_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sizes:
    """Everything the full run and the dry run differ in."""

    attn_rows: int = 2
    attn_heads: int = 12
    attn_head_dim: int = 64
    seq_len: int = 4096
    docs: int = 4  # documents a row
    images_per_doc: int = 2
    autoencoder: str = "paper"  # preset: its latent shape sets the patches per image (paper: 32x32x8 -> 256)
    vocab_size: int = 2048
    train: list = field(default_factory=lambda: [("0.16B", 8, False, "auto"), ("0.16B", 8, True, "auto"),
                                                 ("0.37B", 4, False, "fsdp2")])  # preset, rows, compile, strategy
    train_steps: int = 10
    train_warmup: int = 3
    peak_n: int = 8192
    gen_preset: str = "0.16B"
    gen_batches: tuple = (1, 32)
    gen_steps: int = 250
    text_prompt: int = 128
    text_new: int = 256
    equal_steps: int = 8  # denoising steps of the cache == recompute check
    quickstart: list = field(default_factory=list)  # extra quickstart arguments
    quickstart_timeout: int = 420


DRY = Sizes(attn_rows=2, attn_heads=2, attn_head_dim=16, seq_len=128, docs=2, images_per_doc=2, autoencoder="debug",
            vocab_size=512, train=[("debug", 2, False, "auto"), ("debug", 2, True, "auto"), ("debug", 2, False, "fsdp2")],
            train_steps=2, train_warmup=1, peak_n=256, gen_preset="debug", gen_batches=(1, 2), gen_steps=3,
            text_prompt=8, text_new=4, equal_steps=3,
            quickstart=["--autoencoder_steps", "2", "--steps", "2", "--preset", "debug", "--predict_examples", "2",
                        "--inference_steps", "2", "--curve_examples", "2"], quickstart_timeout=600)

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


class Report:
    """Result rows (section, check, value, target, ok) for the table, details by section for the JSON."""

    def __init__(self):
        self.rows, self.details, self.failures = [], {}, []

    def row(self, section: str, check: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append({"section": section, "check": check, "value": value, "target": target, "ok": ok})
        status = "" if ok is None else " ok" if ok else " FAIL"
        print(f"[{section}] {check}: {value}{f' (target {target})' if target else ''}{status}", flush=True)

    @contextlib.contextmanager
    def section(self, name: str, check: str):
        """Run one check; an exception becomes a FAIL row and the run goes on."""
        try:
            yield
        except Exception as error:  # noqa: BLE001  (report every failure, run every check)
            self.failures.append({"section": name, "check": check, "error": repr(error),
                                  "traceback": traceback.format_exc()})
            self.row(name, check, f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}",
                     "no failure", False)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def markdown(self) -> str:
        lines = ["| section | check | value | target | status |", "|---|---|---|---|---|"]
        for r in self.rows:
            status = "" if r["ok"] is None else "ok" if r["ok"] else "**FAIL**"
            lines.append(f"| {r['section']} | {r['check']} | {r['value']} | {r['target']} | {status} |")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- helpers

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Best FLOP/s of an n x n x n matmul (the dense peak MFU is measured against)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    inner = 20 if device.type == "cuda" else 2
    return 2 * n**3 * inner / timed(lambda: [a @ b for _ in range(inner)], device, reps=5, warmup=2)


def packed_layout(rows: int, L: int, n: int, docs: int, images_per_doc: int, vocab: int, boi: int, eoi: int,
                  pad: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Tokens, document ids and image ids (rows, L) of packed rows: ``docs`` documents a row, each a text with
    ``images_per_doc`` images (BOI, n patches, EOI) spread through it; the last row ends in ``pad`` padding
    positions (a document of their own). Image ids are row-major. Returns the number of images too."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, L), generator=g)
    doc, img, image = torch.full((rows, L), docs, dtype=torch.long), torch.full((rows, L), -1), 0
    for r in range(rows):
        length = L - (pad if r == rows - 1 else 0)
        bounds = [round(d * length / docs) for d in range(docs + 1)]
        for d in range(docs):
            a, b = bounds[d], bounds[d + 1]
            doc[r, a:b] = d
            gap = (b - a - images_per_doc * (n + 2)) // (images_per_doc + 1)
            if gap < 1:
                raise ValueError(f"{images_per_doc} images of {n} patches do not fit a document of {b - a} positions")
            pos = a + gap
            for _ in range(images_per_doc):
                tokens[r, pos], tokens[r, pos + n + 1] = boi, eoi
                img[r, pos + 1:pos + 1 + n] = image
                image, pos = image + 1, pos + n + 2 + gap
    return tokens, doc, img, image


def make_tokenizer(workdir: str, vocab_size: int) -> str:
    from transfusion.cli import tokenizer_main

    path = os.path.join(workdir, "tokenizer.model")
    tokenizer_main(["--output", path, "--vocab_size", str(vocab_size)])
    return path


def patches_per_image(autoencoder: str, patch_size: int = 2) -> int:
    from transfusion.models.autoencoder import AutoencoderConfig

    cfg = AutoencoderConfig.from_name(autoencoder)
    return (cfg.latent_size // patch_size) ** 2


# ---------------------------------------------------------------------------------------- 1. attention

def check_attention(report: Report, sizes: Sizes, device: torch.device) -> None:
    from transfusion.models.attention import attend, block_mask, dense_mask

    n = patches_per_image(sizes.autoencoder)
    B, H, L, Dh = sizes.attn_rows, sizes.attn_heads, sizes.seq_len, sizes.attn_head_dim
    _, doc, img, images = packed_layout(B, L, n, sizes.docs, sizes.images_per_doc, 2, 0, 1, pad=L // 16)
    doc, img = doc.to(device), img.to(device)
    masks = {"flex": block_mask(doc, img), "sdpa": dense_mask(doc, img)}
    g = torch.Generator(device).manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, L, Dh, generator=g, device=device, dtype=torch.float64) for _ in range(4))
    layout = f"{B} x {L}, {H} heads of {Dh}, {sizes.docs} docs a row, {images} images of {n} patches, padded tail"
    report.details["attention"] = {"layout": layout, "runs": []}

    def forward_backward(kind: str, dtype: torch.dtype, backward: bool):
        leaves = [x.detach().to(dtype).requires_grad_(backward) for x in (q, k, v)]
        if kind == "ref":  # float64 SDPA (math kernel)
            out = F.scaled_dot_product_attention(*leaves, attn_mask=masks["sdpa"])
        else:
            out = attend(*leaves, masks[kind])
        if not backward:
            return [out.double()]
        out.backward(dout.to(dtype))
        return [out.double()] + [x.grad.double() for x in leaves]

    reference = forward_backward("ref", torch.float64, True)
    flex_backward = device.type == "cuda"  # FlexAttention has no CPU backward
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        results = {}
        for kind in ("flex", "sdpa"):
            backward = kind == "sdpa" or flex_backward
            with report.section("attention", f"{kind} {name}"):
                got = forward_backward(kind, dtype, backward)
                errors = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, reference)]
                results[kind] = got
                with torch.no_grad():
                    fwd = timed(lambda: forward_backward(kind, dtype, False), device)
                fwd_bwd = timed(lambda: forward_backward(kind, dtype, True), device) if backward else None
                tol = TOLERANCE[dtype]
                entry = {"kernel": kind, "dtype": name, "errors_out_dq_dk_dv": errors, "tolerance": tol,
                         "forward_ms": 1e3 * fwd, "forward_backward_ms": None if fwd_bwd is None else 1e3 * fwd_bwd}
                report.details["attention"]["runs"].append(entry)
                value = ("error vs float64 out/dq/dk/dv " + "/".join(f"{e:.1e}" for e in errors)
                         + ("" if backward else " (forward only: no backward on CPU)")
                         + f"; {1e3 * fwd:.2f} ms fwd" + ("" if fwd_bwd is None else f", {1e3 * fwd_bwd:.2f} ms fwd+bwd"))
                report.row("attention", f"{'FlexAttention (compiled)' if kind == 'flex' else 'dense-mask SDPA'} {name}",
                           value, f"<= {tol:g}", max(errors) <= tol)
        if len(results) == 2:
            diff = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(results["flex"], results["sdpa"])]
            report.row("attention", f"FlexAttention vs SDPA {name}", "max rel diff " + "/".join(f"{d:.1e}" for d in diff),
                       f"<= {2 * TOLERANCE[dtype]:g}", max(diff) <= 2 * TOLERANCE[dtype])
    if device.type == "cuda":  # grouped-query attention (a further compile: not in the CPU dry run)
        check_gqa_attention(report, masks, q, k, v, dout)
    report.row("attention", "layout", layout)


def check_gqa_attention(report: Report, masks: dict, q, k, v, dout) -> None:
    """FlexAttention and SDPA with ``enable_gqa`` (H / 4 K/V heads, never repeated) against float64 SDPA over the K/V
    heads repeated to H, forward and backward."""
    from transfusion.models.attention import attend

    groups = next(g for g in (4, 2, 1) if q.shape[1] % g == 0)

    k, v = k[:, ::groups].contiguous(), v[:, ::groups].contiguous()  # (B, H / groups, L, Dh)

    def forward_backward(kind: str, dtype: torch.dtype):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        if kind == "ref":
            out = F.scaled_dot_product_attention(leaves[0], *(x.repeat_interleave(groups, 1) for x in leaves[1:]),
                                                 attn_mask=masks["sdpa"])
        else:
            out = attend(*leaves, masks[kind])
        out.backward(dout.to(dtype))
        return [out.double()] + [x.grad.double() for x in leaves]

    reference = forward_backward("ref", torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for kind in ("flex", "sdpa"):
            with report.section("attention", f"{kind} gqa {name}"):
                errors = [float((a - b).abs().max() / b.abs().max())
                          for a, b in zip(forward_backward(kind, dtype), reference)]
                report.details["attention"]["runs"].append({"kernel": f"{kind} gqa", "dtype": name,
                                                            "errors_out_dq_dk_dv": errors})
                report.row("attention", f"{'FlexAttention' if kind == 'flex' else 'SDPA'} GQA ({q.shape[1]} query / "
                           f"{k.shape[1]} K/V heads) {name}", "error vs float64 out/dq/dk/dv "
                           + "/".join(f"{e:.1e}" for e in errors), f"<= {TOLERANCE[dtype]:g}",
                           max(errors) <= TOLERANCE[dtype])


# ---------------------------------------------------------------------------------------- 2. training

class SyntheticRows(torch.utils.data.Dataset):
    """The same packed batch at every step (speed does not depend on the data)."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict:
        return self.batch


def training_batch(tokenizer, rows: int, sizes: Sizes, n: int, latent_shape: tuple[int, int, int]) -> dict:
    tokens, doc, img, images = packed_layout(rows, sizes.seq_len, n, sizes.docs, sizes.images_per_doc,
                                             tokenizer.vocab_size, tokenizer.boi_id, tokenizer.eoi_id)
    return {"tokens": tokens, "doc_ids": doc, "image_ids": img, "images": torch.randn(images, *latent_shape),
            "max_t": torch.zeros(images, dtype=torch.long)}  # max_t 0: the full schedule


def train_run(tokenizer_path: str, sizes: Sizes, device: torch.device, preset: str, rows: int, compile: bool,
              strategy: str, workdir: str) -> dict:
    import lightning as L

    from transfusion.lightning.parallel import FSDP2Strategy
    from transfusion.lightning.transfusion import TransfusionModule

    class StepTimer(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_start(self, *args):
            synchronize(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args):
            synchronize(device)
            self.times.append(time.perf_counter() - self.start)

    L.seed_everything(0, verbose=False)
    module = TransfusionModule(tokenizer_path, {"preset": sizes.autoencoder}, preset=preset, compile=compile,
                               transformer={"max_seq_len": sizes.seq_len}, warmup_steps=10)
    latent_shape = (module.config.latent_channels, module.config.latent_size, module.config.latent_size)
    batch = training_batch(module.tokenizer, rows, sizes, module.config.patches_per_image, latent_shape)
    steps = sizes.train_warmup + sizes.train_steps
    timer = StepTimer()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        strategy=FSDP2Strategy() if strategy == "fsdp2" else "auto", max_steps=steps,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        default_root_dir=workdir)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    loader = torch.utils.data.DataLoader(SyntheticRows(batch, steps), batch_size=None)
    try:
        trainer.fit(module, loader)
    finally:  # a later run in this process starts its own process group
        if strategy == "fsdp2" and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    wall = time.perf_counter() - started
    step_s = statistics.median(timer.times[sizes.train_warmup:])
    flops_per_step = module.flop_counter.exact_flops / trainer.global_step
    result = {"preset": preset, "rows": rows, "seq_len": sizes.seq_len, "compile": compile, "strategy": strategy,
              "steps": trainer.global_step, "step_s": step_s, "first_step_s": timer.times[0], "wall_s": wall,
              "tokens_per_s": rows * sizes.seq_len / step_s, "flops_per_step": flops_per_step,
              "params": module.flop_counter.params,
              "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
              "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}
    del trainer, module
    return result


def check_training(report: Report, sizes: Sizes, device: torch.device, tokenizer: str, workdir: str) -> None:
    peak = matmul_peak(device, torch.bfloat16, sizes.peak_n)
    report.details["training"] = {"bf16_matmul_peak_flops": peak, "runs": []}
    report.row("training", f"bf16 matmul peak ({sizes.peak_n}^3)", f"{peak / 1e12:.1f} TFLOP/s")
    for preset, rows, compile, strategy in sizes.train:
        name = f"{preset} bf16-mixed{' + compile' if compile else ''}{' FSDP2, 1 device' if strategy == 'fsdp2' else ''}"
        with report.section("training", name):
            r = train_run(tokenizer, sizes, device, preset, rows, compile, strategy, workdir)
            r["mfu"] = r["flops_per_step"] / r["step_s"] / peak
            report.details["training"]["runs"].append(r)
            memory = "" if r["peak_memory_gb"] is None else f", peak memory {r['peak_memory_gb']:.1f} GiB"
            value = (f"{rows} x {r['seq_len']}: {r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%{memory}, "
                     f"first step {r['first_step_s']:.1f} s, loss {r['final_loss']:.2f}")
            gpu_target = device.type == "cuda" and preset == "0.16B"
            finite = r["final_loss"] == r["final_loss"]
            report.row("training", name, value, "MFU >= 40%" if gpu_target else "finite loss",
                       (r["mfu"] >= 0.4 and finite) if gpu_target else finite)


# ---------------------------------------------------------------------------------------- 3. generation

def check_generation(report: Report, sizes: Sizes, device: torch.device, tokenizer: str) -> None:
    from transfusion.data.embedded.shapes import ShapesDataset
    from transfusion.generation import IMAGE

    module = build_module(tokenizer, {"preset": sizes.autoencoder}, sizes.gen_preset, sizes.seq_len, 0).to(device)
    tok = module.tokenizer
    caption = text_of(tok, 16)
    report.details["generation"] = {"preset": sizes.gen_preset, "patches_per_image": module.config.patches_per_image}
    for batch in sizes.gen_batches:
        with report.section("generation", f"images, batch {batch}"):
            captions, seeds = [caption] * batch, list(range(batch))
            module.generator(num_steps=2).generate_images(captions, seeds)  # warm-up
            seconds = timed(lambda: module.generator(max_new_tokens=0, cfg_scale=5.0, num_steps=sizes.gen_steps,
                                                     sampler="ddpm").generate_images(captions, seeds),
                            device, reps=1, warmup=0)
            report.details["generation"][f"batch_{batch}_s"] = seconds
            report.row("generation", f"images/s, batch {batch} (guidance 5, DDPM {sizes.gen_steps} steps, decoded)",
                       f"{batch / seconds:.2f} images/s ({1e3 * seconds / sizes.gen_steps:.1f} ms a step)")
    with report.section("generation", "text tokens/s"), suppress_tokens(module, [tok.eos_id, tok.boi_id]):
        prompt = text_of(tok, sizes.text_prompt)

        def text(new_tokens: int):
            return lambda: module.generator(max_new_tokens=new_tokens, cfg_scale=1.0).generate([prompt])

        prefill = timed(text(0), device, reps=3)
        total = timed(text(sizes.text_new), device, reps=3)
        per_token = (total - prefill) / sizes.text_new
        report.details["generation"].update(text_prefill_s=prefill, text_total_s=total, text_ms_per_token=1e3 * per_token)
        report.row("generation", f"text, {sizes.text_prompt}-token prompt + {sizes.text_new} tokens, KV cache",
                   f"{1 / per_token:.0f} tokens/s decoding ({1e3 * per_token:.2f} ms a token), prefill {1e3 * prefill:.0f} ms")
    with report.section("generation", "cache == recompute (float64)"):
        module.double()
        pixels = ShapesDataset(2, module.autoencoder.config.image_size, seed=0)[0]["image"].double().to(device)
        prompts = [[caption, IMAGE], [pixels]]
        outs = [module.generator(max_new_tokens=6, cfg_scale=5.0, num_steps=sizes.equal_steps, use_cache=c)
                .generate(prompts, seeds=[1, 2], decode=False) for c in (True, False)]
        same_text, worst = True, 0.0
        for a, b in zip(*outs):
            same_text &= [type(s) for s in a] == [type(s) for s in b]
            for x, y in zip(a, b):
                if isinstance(x, str):
                    same_text &= x == y
                else:
                    worst = max(worst, float((x - y).abs().max() / y.abs().max()))
        report.details["generation"].update(cache_equal_text=same_text, cache_latent_rel_diff=worst)
        report.row("generation", "KV cache == recompute (float64, guidance, caption -> image -> text and image -> text)",
                   f"text {'identical' if same_text else 'DIFFERS'}, latents max rel diff {worst:.1e}",
                   "identical, <= 1e-9", same_text and worst <= 1e-9)
    del module


# ---------------------------------------------------------------------------------------- 4. quickstart

def check_quickstart(report: Report, sizes: Sizes, device: torch.device, workdir: str) -> None:
    out = Path(workdir) / "quickstart"
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    cmd = [sys.executable, "-m", "transfusion.cli", "quickstart", "--output", str(out), "--accelerator", accelerator,
           *sizes.quickstart]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=sizes.quickstart_timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"quickstart exited {done.returncode}: {done.stderr[-2000:]}")
    q = json.loads((out / "report.json").read_text())
    report.details["quickstart"] = {"wall_s": wall, "timings": q["timings"], "follow": q["follow"]["image_rates"],
                                    "captions": q["follow"]["caption_rates"],
                                    "val_lm_ppl": q["transfusion"]["val/lm_ppl"]["last"][1], "args": sizes.quickstart}
    stages = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in q["timings"].items())
    report.row("quickstart", f"wall time ({accelerator})", f"{wall:.0f} s ({stages})")
    rates = q["follow"]["image_rates"]
    report.row("quickstart", f"caption -> image, {q['follow']['images']} held-out captions",
               ", ".join(f"{k} {rates[k]:.0%}" for k in ("colour", "position", "size", "shape", "all", "one_object")))
    rates = q["follow"]["caption_rates"]
    report.row("quickstart", f"image -> caption, {q['follow']['captions']} held-out images",
               ", ".join(f"{k} {rates[k]:.0%}" for k in ("colour", "position", "size", "shape", "all")))
    report.row("quickstart", "validation LM perplexity", f"{q['transfusion']['val/lm_ppl']['last'][1]:.1f}")


# ---------------------------------------------------------------------------------------- main

SECTIONS = ("attention", "training", "generation", "quickstart")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes (automatic without CUDA)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--output", default="gpu_check.json", help="the JSON results")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 2 on a dry CPU run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dry = args.dry or device.type != "cuda"
    sizes = DRY if dry else Sizes()
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"# gpu_check: {name}, torch {torch.__version__}, {'dry (tiny sizes)' if dry else 'full'}", flush=True)

    report, started = Report(), time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = make_tokenizer(workdir, sizes.vocab_size)
        for section in sections:
            t0 = time.perf_counter()
            with report.section(section, "section"):
                if section == "attention":
                    check_attention(report, sizes, device)
                elif section == "training":
                    check_training(report, sizes, device, tokenizer, workdir)
                elif section == "generation":
                    check_generation(report, sizes, device, tokenizer)
                else:
                    check_quickstart(report, sizes, device, workdir)
            report.details.setdefault("section_s", {})[section] = time.perf_counter() - t0
    elapsed = time.perf_counter() - started
    results = {"device": name, "torch": torch.__version__, "dry": dry, "sizes": asdict(sizes), "elapsed_s": elapsed,
               "rows": report.rows, "details": report.details, "failures": report.failures}
    Path(args.output).write_text(json.dumps(results, indent=1, default=str))
    print(f"\n## gpu_check on {name} ({'dry' if dry else 'full'}), torch {torch.__version__}, {elapsed:.0f} s\n")
    print(report.markdown())
    failed = [r for r in report.rows if r["ok"] is False]
    print(f"\n{len(failed)} failed check(s); JSON: {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
