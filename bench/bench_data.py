"""Data pipeline speed: DataLoader batches/s against training steps/s, and latent caching against on-the-fly encoding.

Everything is made in a temporary directory: an image folder of ``--images`` JPEG photographs-like images
(``--source_size`` px, smooth gradients plus noise, so decoding and resizing cost what real photos cost)
with two captions each, a text file (the embedded news corpus), a tokenizer and a one-step "embedded"
autoencoder (32px -> 8x8x4 latents, 16 patches per image). Rows are built by ``ImageTextDataModule`` exactly
as in training (``seq_len`` 96, batch 32, text:image-caption tokens 1:1: the CPU configs).

    python bench/bench_data.py                      # about 2 minutes on 2 cores
    python bench/bench_data.py --output data.json   # also write the numbers as JSON
    python bench/bench_data.py --streamed --quick   # streamed shards: samples/s per worker vs one H100's demand
                                                    # (bench_stream.py; seconds with --quick)

Measured, best of ``--repeats`` rounds (noise on a shared machine only ever adds time):

* loader batches/s with 0, 1 and 2 worker processes, reading pixels (decode + resize + crop every time) and
  reading a latent cache made by ``transfusion.data.sources.latent_cache.write_cache``;
* training steps/s (forward, backward, AdamW step) for the ``cpu-small`` and ``cpu-base`` presets, on
  batches already in memory: with pixels (the frozen encoder runs every step) and with cached latents.

The ratio loader batches/s : training steps/s says whether data loading can keep the model busy (>= 1
with the workers the CPU configs use); cached / on-the-fly steps/s is what the cache saves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_generation.py: idle threads must not spin

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from transfusion._torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # before lightning -> torchmetrics -> torchvision

from bench_generation import make_assets  # noqa: E402


def make_images(folder: Path, count: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        a, b, c = rng.random((3, 3))
        pixels = (np.stack([a[k] * x + b[k] * y + c[k] * x * y for k in range(3)], -1) * 180
                  + rng.normal(0, 20, (size, size, 3)))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
        lines.append(json.dumps({"file_name": f"{i:05d}.jpg", "text": [f"picture number {i}", f"a smooth gradient {i % 7}"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def loader_rate(dm, workers: int, batches: int, repeats: int) -> float:
    """Best batches/s over ``repeats`` passes of ``batches`` batches (worker start-up excluded)."""
    dm.hparams.num_workers = workers
    best = 0.0
    for _ in range(repeats):
        iterator = iter(dm.train_dataloader())
        next(iterator)  # workers started, first batch in
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        best = max(best, batches / (time.perf_counter() - start))
        del iterator
    return best


def step_rate(module, batches: list[dict], repeats: int) -> float:
    """Best training steps/s: encode (unless cached), Transfusion loss, backward, AdamW step."""
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4)
    module.train()
    best = 0.0
    for r in range(repeats + 1):  # round 0 warms up
        start = time.perf_counter()
        for batch in batches:
            latents = module.encode_images(batch["images"])
            max_t = torch.where(batch["max_t"] > 0, batch["max_t"], 1000)
            out = module.model.loss(batch["tokens"], batch["doc_ids"], batch["image_ids"], latents, max_t,
                                    pad_id=module.tokenizer.pad_id, boi_id=module.tokenizer.boi_id)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
        if r:
            best = max(best, len(batches) / (time.perf_counter() - start))
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--source_size", type=int, default=256, help="side of the stored JPEGs (resized to 32)")
    parser.add_argument("--batches", type=int, default=20, help="batches per loader measurement")
    parser.add_argument("--steps", type=int, default=5, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["cpu-small", "cpu-base"])
    parser.add_argument("--output", default=None)
    parser.add_argument("--streamed", action="store_true", help="measure streamed shards instead (bench_stream.py)")
    parser.add_argument("--quick", action="store_true", help="with --streamed: small shards, short measurements")
    args = parser.parse_args(argv)
    if args.streamed:
        from bench_stream import main as streamed_main

        return streamed_main(["--quick"] * args.quick + (["--output", args.output] if args.output else []))
    torch.set_num_threads(args.threads)

    from transfusion.data.embedded.text import EMBEDDED_TEXT
    from transfusion.data.modules.image_text import ImageTextDataModule
    from transfusion.data.sources import ImageFolderSource, TextFilesSource
    from transfusion.data.sources.latent_cache import write_cache
    from transfusion.lightning.transfusion import TransfusionModule

    results = {"threads": args.threads, "images": args.images, "source_size": args.source_size}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        tokenizer, autoencoder = make_assets(str(work), 2048, 0)
        make_images(work / "images", args.images, args.source_size, 0)
        module = TransfusionModule(tokenizer, autoencoder, preset=args.presets[0])
        layout = module.sequence_layout()

        def datamodule(**kw):
            dm = ImageTextDataModule(ImageFolderSource(str(work / "images")), TextFilesSource(str(EMBEDDED_TEXT)),
                                     seq_len=96, batch_size=32, rows_per_epoch=100_000, layout=layout, **kw)
            dm.setup("fit")
            return dm

        pixels = datamodule()
        start = time.perf_counter()
        write_cache({s: pixels.pairs[s] for s in ("train", "validation")}, module.autoencoder, work / "cache", 64)
        results["cache_seconds"] = time.perf_counter() - start
        cached = datamodule(latent_cache=str(work / "cache"))

        results["loader"] = {}
        for name, dm in (("pixels", pixels), ("cached", cached)):
            for workers in (0, 1, 2):
                rate = loader_rate(dm, workers, args.batches, args.repeats)
                results["loader"][f"{name}, {workers} workers"] = rate
                print(f"loader {name:6s} {workers} workers: {rate:7.2f} batches/s", flush=True)

        batches = {name: [b for _, b in zip(range(args.steps), iter(dm.train_dataloader()))]
                   for name, dm in (("pixels", pixels), ("cached", cached))}
        results["train"] = {}
        for preset in args.presets:
            torch.manual_seed(0)
            module = TransfusionModule(tokenizer, autoencoder, preset=preset)
            for name in ("pixels", "cached"):
                rate = step_rate(module, batches[name], args.repeats)
                results["train"][f"{preset}, {name}"] = rate
                print(f"train {preset} {name:6s}: {rate:6.2f} steps/s", flush=True)

    print()
    print(f"| | batches/s or steps/s ({args.threads} threads, batch 32 x 96 tokens) |")
    print("|---|---|")
    for key, value in {**{f"loader: {k}": v for k, v in results["loader"].items()},
                       **{f"train step: {k}": v for k, v in results["train"].items()}}.items():
        print(f"| {key} | {value:.2f} |")
    print()
    for preset in args.presets:
        step = results["train"][f"{preset}, pixels"]
        for workers in (1, 2):
            ratio = results["loader"][f"pixels, {workers} workers"] / step
            print(f"loader ({workers} workers, pixels) / {preset} training steps: {ratio:.1f}x")
        print(f"{preset}: cached latents / on-the-fly encoding, steps/s: "
              f"{results['train'][f'{preset}, cached'] / step:.2f}x")
    print(f"caching {args.images} images took {results['cache_seconds']:.1f} s")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
