"""Why colour lags in the quickstart: the measurements of data/quickstart/README.md ("Colour"), on a finished run.

    python data/quickstart/colour_probe.py OUTPUT_DIR            # a `transfusion quickstart --output OUTPUT_DIR` folder

1. by size: caption -> image colour of the run's own samples (samples/generations.jsonl), small and large shapes
   apart, with every miss listed;
2. reconstructions: the colour read back from the autoencoder's reconstruction of every attribute combination;
3. caption use by timestep: for 48 small held-out shapes, the error of the clean latent implied by the predicted
   noise, x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab), with the right caption, with another colour in it, and with no
   caption: where along the noise scale the model reads the colour word;
4. where colour is decided: the sampler of `predict` (DDPM 100, CFG 5) started from the asked picture noised to t0
   instead of from pure noise, for the captions the run gets wrong: from a small t0 the picture's colour survives
   unless the model pulls it away; from t0 = 1000 the model sets it alone;
5. with --cfg S ...: prompt following of the run's predict captions and seeds generated again at each guidance scale.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from PIL import Image

from transfusion.data.embedded.shapes import (COLOURS, ShapeAttributes, ShapesDataset, all_attributes, draw,
                                              parse_caption)
from transfusion.evaluation.follow import read_shapes
from transfusion.images import to_tensor
from transfusion.lightning.transfusion import TransfusionModule
from transfusion.schedules.base import steps

T0S = (1000, 900, 800, 700, 600, 500, 300)


def by_size(samples: Path) -> list[dict]:
    """The text-to-image records of a predict folder with what was asked and what the pixels say."""
    records = [json.loads(line) for line in (samples / "generations.jsonl").read_text().splitlines()]
    out = []
    for r in records:
        if r["kind"] == "text-to-image":
            read = read_shapes(to_tensor(Image.open(samples / r["images"][0])))
            out.append({"caption": r["reference"], "asked": parse_caption(r["reference"]), "read": read})
    for size in ("small", "large"):
        rows = [o for o in out if o["asked"]["size"] == size]
        right = sum(o["read"]["colour"] == o["asked"]["colour"] for o in rows)
        print(f"{size}: colour right {right} of {len(rows)}")
    for o in out:
        if o["read"]["colour"] != o["asked"]["colour"]:
            print(f"  {o['caption']!r}: read {o['read']['colour']} ({o['read']['size']} {o['read']['shape']})")
    return out


@torch.no_grad()
def reconstructions(module: TransfusionModule) -> int:
    """Combinations whose reconstruction reads another colour than the original."""
    ae, attrs = module.autoencoder.model, all_attributes()
    x = torch.stack([to_tensor(draw(a, ae.config.image_size)) for a in attrs])
    rec = ae.decode_latents(ae.encode_latents(x))
    wrong = [a for a, r in zip(attrs, rec) if read_shapes(r)["colour"] != a.colour]
    print(f"reconstructions: {len(attrs) - len(wrong)} of {len(attrs)} combinations keep their colour {wrong}")
    return len(wrong)


def _rows(module: TransfusionModule, captions: list[str | None]):
    """Tokens, document ids and image ids of ``BOS caption BOI <n patches> EOI``, one row an image."""
    tok, n = module.tokenizer, module.model.cfg.patches_per_image
    docs = [[tok.bos_id] + (tok.encode(c) if c else []) + [tok.boi_id] + [-1] * n + [tok.eoi_id] for c in captions]
    L = max(map(len, docs))
    tokens = torch.full((len(docs), L), tok.pad_id)
    doc_ids = torch.ones(len(docs), L, dtype=torch.long)
    image_ids = torch.full((len(docs), L), -1)
    for r, d in enumerate(docs):
        d = torch.tensor(d)
        tokens[r, :len(d)] = torch.where(d < 0, tok.pad_id, d)
        doc_ids[r, :len(d)] = 0
        image_ids[r, :len(d)][d < 0] = r
    return tokens, doc_ids, image_ids


@torch.no_grad()
def caption_use(module: TransfusionModule, count: int = 48) -> dict:
    """x0 mean squared error by timestep with the right caption, another colour, no caption (small shapes)."""
    items = [it for it in (ShapesDataset(400, module.autoencoder.config.image_size, seed=2)[i] for i in range(400))
             if it["attributes"].size == "small"][:count]
    x0 = module.encode_images(torch.stack([it["image"] for it in items]))
    colours = list(COLOURS)
    other = [colours[(colours.index(it["attributes"].colour) + 1 + k % 5) % 6] for k, it in enumerate(items)]
    captions = {"right": [it["captions"][0] for it in items],
                "other colour": [it["captions"][0].replace(f" {it['attributes'].colour} ", f" {o} ")
                                 for it, o in zip(items, other)],
                "no caption": [None] * len(items)}
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    diffusion, table = module.model.schedule, {}
    print("t | SNR | x0 MSE: right caption | other colour | no caption")
    for t in (50, 150, 300, 450, 600, 700, 800, 900, 950):
        tt = torch.full((len(items),), t)
        x_t, ab = diffusion.add_noise(x0, noise, tt), float(diffusion.alpha_bar[t])
        table[t] = {}
        for name, caps in captions.items():
            _, eps = module.model(*_rows(module, caps), x_t, tt)
            table[t][name] = float(((x_t - (1 - ab) ** 0.5 * eps) / ab ** 0.5 - x0).pow(2).mean())
        print(f"{t} | {ab / (1 - ab):.3g} | " + " | ".join(f"{v:.4f}" for v in table[t].values()), flush=True)
    return table


@torch.no_grad()
def decided(module: TransfusionModule, captions: list[str], seeds: int = 6) -> dict:
    """Colours read after sampling from the asked picture noised to each t0 (1000: pure noise)."""
    diffusion, size = module.model.schedule, module.autoencoder.config.image_size
    sample, table = diffusion.sample, {}
    try:
        for caption in captions:
            a = parse_caption(caption)
            x0 = module.encode_images(to_tensor(draw(ShapeAttributes(**a), size))[None])
            for t0 in T0S:
                def from_t0(eps_fn, shape, num_steps=100, sampler="ddpm", generator=None, clip_x0=None, **_):
                    levels = [t for t in diffusion.timesteps_for_inference(num_steps).tolist() if t <= t0] + [0]
                    noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generator])
                    x = noise if t0 >= diffusion.num_timesteps else diffusion.add_noise(
                        x0.expand(shape), noise, torch.full((shape[0],), levels[0]))
                    step = diffusion.ddpm_step if sampler == "ddpm" else diffusion.ddim_step
                    for t, t_prev in steps(levels):
                        x = step(x, eps_fn(x, torch.full((shape[0],), t)), t, t_prev, generator=generator,
                                 clip_x0=clip_x0)
                    return x

                diffusion.sample = from_t0
                images = module.generator().generate_images([caption] * seeds, list(range(100, 100 + seeds)))
                table[(caption, t0)] = collections.Counter(read_shapes(i)["colour"] for i in images)
                print(f"{caption!r} from t0 = {t0}: {dict(table[(caption, t0)])}", flush=True)
    finally:
        diffusion.sample = sample
    return table


@torch.no_grad()
def guidance(module: TransfusionModule, samples: Path, scales: list[float]) -> dict:
    """FollowScore rates (and small shapes' colour) of the predict captions and seeds at each CFG scale."""
    from transfusion.evaluation.follow import FollowScore

    records = [json.loads(line) for line in (samples / "generations.jsonl").read_text().splitlines()]
    records = [r for r in records if r["kind"] == "text-to-image"]
    captions = [r["reference"] for r in records]
    seeds = [module.hparams.generation_seed + r["index"] for r in records]
    table = {}
    for scale in scales:
        generator = module.generator(cfg_scale=scale)
        images = torch.cat([generator.generate_images(captions[i:i + 32], seeds[i:i + 32])
                            for i in range(0, len(captions), 32)])
        score, small = FollowScore(), FollowScore()
        score.update(images, captions)
        keep = [i for i, c in enumerate(captions) if parse_caption(c)["size"] == "small"]
        small.update(images[keep], [captions[i] for i in keep])
        table[scale] = {**score.compute(), "small_colour": small.compute()["colour"]}
        print(f"CFG {scale}: " + ", ".join(f"{k} {v:.0%}" for k, v in table[scale].items()), flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="a quickstart output folder")
    parser.add_argument("--captions", nargs="*", default=None,
                        help="captions for 4. (default: the two most frequent colour misses of 1.)")
    parser.add_argument("--cfg", type=float, nargs="*", default=[], help="guidance scales for 5. (default: none)")
    args = parser.parse_args()
    ckpt = next((args.output / "transfusion").rglob("last.ckpt"))
    module = TransfusionModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    misses = by_size(args.output / "samples")
    reconstructions(module)
    caption_use(module)
    captions = args.captions
    if captions is None:
        counts = collections.Counter(o["caption"] for o in misses if o["read"]["colour"] != o["asked"]["colour"])
        captions = [caption for caption, _ in counts.most_common(2)]
    decided(module, captions)
    if args.cfg:
        guidance(module, args.output / "samples", args.cfg)


if __name__ == "__main__":
    main()
