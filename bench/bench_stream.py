"""Streamed shards (``transfusion.data.shards``): samples/s of one data worker, and the peak memory of a stream.

    python bench/bench_stream.py --quick          # seconds: samples/s per worker, pixels and latents
    python bench/bench_stream.py --memory 2000    # peak RSS streaming N and 10 N samples, each in a fresh process

Samples/s per worker: one consumer (the work of one DataLoader worker) reads tar shards written here, decodes and
resizes each JPEG (``--source_size`` px) to ``--image_size`` with ``transfusion/data/preprocess.py`` (pixel shards),
or loads stored latents (latent shards: (4, s/8, s/8) float32), and packs rows of ``--seq_len``. Printed next to
what one H100 consumes at 40% MFU (989 TFLOP/s bf16 dense peak; 6 N FLOPs per token, N from
``transfusion/flops.py``) for the 0.16B and 0.76B presets: the workers one GPU needs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transfusion._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before lightning -> torchmetrics -> torchvision

H100_BF16 = 989e12  # dense peak, FLOP/s
MFU = 0.40


def write_shards(folder: Path, count: int, image: str, source_size: int, latent_shape: tuple, per_shard: int = 500,
                 fingerprint: str | None = None) -> None:
    """``count`` pair records in tar shards (JPEG photographs-like images, or latents) with an index.json."""
    from transfusion.data.shards.format import array_bytes, dump_index, new_index, shard_name

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    index = new_index("webdataset", "pairs", image, autoencoder_fingerprint=fingerprint)
    y, x = np.mgrid[0:source_size, 0:source_size] / source_size
    templates = []
    for _ in range(16):  # a few smooth images with noise, re-encoded per record (costs what photographs cost)
        a, b, c = rng.random((3, 3))
        pixels = np.stack([a[k] * x + b[k] * y + c[k] * x * y for k in range(3)], -1) * 180 + rng.normal(0, 20, (source_size, source_size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        templates.append(buffer.getvalue())
    for number, start in enumerate(range(0, count, per_shard)):
        name = shard_name("webdataset", number)
        size = min(per_shard, count - start)
        with tarfile.open(folder / name, "w") as tar:
            for i in range(start, start + size):
                members = {"json": json.dumps({"captions": [f"a smooth gradient picture, number {i}"]}).encode()}
                if image == "pixels":
                    members["jpg"] = templates[i % len(templates)]
                else:
                    members["latent.npy"] = array_bytes(rng.standard_normal(latent_shape).astype(np.float32))
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        index["shards"].append({"path": name, "samples": size})
    (folder / "index.json").write_text(dump_index(index))


def consumer(folder: Path, tokenizer: str, image_size: int, seq_len: int, latent: bool):
    from transfusion.data.rows.sequences import SequenceLayout
    from transfusion.data.shards.rows import Consumer, RowContext, Source
    from transfusion.data.shards.stream import open_shard_set
    from transfusion.data.tokenizer import Tokenizer

    patches = (image_size // 8 // 2) ** 2  # an 8x autoencoder, patch 2 (the paper's 256 px: 256 patches)
    layout = SequenceLayout(Tokenizer(tokenizer), patches, image_size)
    shape = (4, image_size // 8, image_size // 8) if latent else (3, image_size, image_size)
    ctx = RowContext(layout, seq_len, shape, caption_dropout=0.0)
    return Consumer([Source("pairs", 1.0, open_shard_set(str(folder)))], ctx, 0, 1), patches


def samples_per_second(folder: Path, tokenizer: str, image_size: int, seq_len: int, latent: bool, seconds: float) -> float:
    stream, _ = consumer(folder, tokenizer, image_size, seq_len, latent)
    stream.next_row()  # shards opened, first row out
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += stream.next_row()["images"].shape[0]
    return images / (time.perf_counter() - start)


def gpu_demand(preset: str, image_size: int, caption_tokens: float) -> dict:
    """Tokens/s one H100 trains at 40% MFU, and image-caption samples/s at 1:1 text:image-caption tokens."""
    from transfusion.flops import flop_parameters
    from transfusion.models.transformer import Transformer, TransformerConfig

    with torch.device("meta"):
        n = flop_parameters(Transformer(TransformerConfig.from_name(preset)))
    tokens = MFU * H100_BF16 / (6 * n)
    per_sample = (image_size // 16) ** 2 + 4 + caption_tokens
    return {"params": n, "tokens_per_s": tokens, "samples_per_s": tokens * 0.5 / per_sample}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shards, short measurements")
    parser.add_argument("--samples", type=int, default=2000, help="samples written per set")
    parser.add_argument("--source_size", type=int, default=512, help="side of the stored JPEGs")
    parser.add_argument("--image_size", type=int, default=256, help="side they are resized to (the paper: 256)")
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--memory", type=int, default=None, help="measure peak RSS streaming N and 10 N samples")
    parser.add_argument("--_stream", default=None, help=argparse.SUPPRESS)  # internal: stream one set, print RSS
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.samples, args.source_size, args.seconds = 300, 256, 3.0
    from transfusion.cli import tokenizer_main

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        tokenizer = str(work / "tokenizer.model")
        tokenizer_main(["--output", tokenizer, "--vocab_size", "1024"])
        if args.memory:
            return memory(work, tokenizer, args)
        results = {"source_size": args.source_size, "image_size": args.image_size, "seq_len": args.seq_len}
        for image in ("pixels", "latents"):
            latent_shape = (4, args.image_size // 8, args.image_size // 8)
            write_shards(work / image, args.samples, image, args.source_size, latent_shape)
            rate = samples_per_second(work / image, tokenizer, args.image_size, args.seq_len, image == "latents",
                                      args.seconds)
            results[f"{image} samples/s per worker"] = rate
            print(f"streamed {image:7s} shards: {rate:8.1f} samples/s per worker "
                  f"({'decode ' + str(args.source_size) + ' px JPEG + resize to ' + str(args.image_size) if image == 'pixels' else 'stored latents'}"
                  f", rows of {args.seq_len})", flush=True)
        caption = 12.0  # tokens of a short caption
        for preset in ("0.16B", "0.76B"):
            need = gpu_demand(preset, args.image_size, caption)
            results[preset] = need
            line = (f"{preset} (N = {need['params'] / 1e6:.0f}M) on one H100 at 40% MFU: {need['tokens_per_s']:,.0f} tokens/s"
                    f" = {need['samples_per_s']:,.0f} image-caption samples/s at 1:1 text; workers needed:")
            for image in ("pixels", "latents"):
                line += f" {image} {math.ceil(need['samples_per_s'] / results[f'{image} samples/s per worker'])}"
            print(line)
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=1))
        return results


def memory(work: Path, tokenizer: str, args) -> dict:
    """Peak RSS of streaming every sample of a set of N, then of 10 N samples (fresh processes)."""
    results = {}
    for count in (args.memory, 10 * args.memory):
        folder = work / f"set{count}"
        write_shards(folder, count, "pixels", 64, (4, 4, 4))
        out = subprocess.run([sys.executable, __file__, "--_stream", str(folder), "--memory", "0", "--samples", str(count)],
                             capture_output=True, text=True, check=True, env=None)
        results[count] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"streamed {count:>7} samples (one pass, 32 px rows of 512): peak RSS {results[count]['peak_rss_mb']:.0f} MB, "
              f"{results[count]['seconds']:.1f} s", flush=True)
    return results


def stream_all(folder: str, samples: int) -> None:
    from transfusion.cli import tokenizer_main

    with tempfile.TemporaryDirectory() as work:
        tokenizer = str(Path(work) / "tokenizer.model")
        tokenizer_main(["--output", tokenizer, "--vocab_size", "1024"])
        stream, _ = consumer(Path(folder), tokenizer, 32, 512, latent=False)
        start, seen = time.perf_counter(), 0
        while stream.streams[0].state["pass"] == 0:
            seen += stream.next_row()["images"].shape[0]
        print(json.dumps({"samples": seen, "peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    if "--_stream" in sys.argv:
        stream_all(sys.argv[sys.argv.index("--_stream") + 1], int(sys.argv[sys.argv.index("--samples") + 1]))
    else:
        main()
