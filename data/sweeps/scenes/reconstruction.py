"""Are the scenes still readable after the autoencoders? GenEval-style per-task accuracy of the pixel reader on
real held-out and training scenes, and on the KL-VAE's and the VQ-VAE's reconstructions of the same pictures;
the first 12 held-out pictures and their reconstructions go to <sweep output>/reconstructions.png. Usage: python data/sweeps/scenes/reconstruction.py [sweep output, default outputs/sweeps/scenes] [pictures, 600]"""
import json
import sys
from pathlib import Path

import torch

from transfusion.data.embedded.scenes import TASKS, ScenesDataset
from transfusion.evaluation.geneval import GenEvalScore
from transfusion.images import image_grid
from transfusion.lightning.autoencoder import AutoencoderModule, VQAutoencoderModule, load_frozen

root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/sweeps/scenes")
count = int(sys.argv[2]) if len(sys.argv) > 2 else 600
prepared = json.loads((root / "prepared.json").read_text())
kl = load_frozen(AutoencoderModule, prepared["autoencoder"])
vq = load_frozen(VQAutoencoderModule, prepared["vqvae"]) if "vqvae" in prepared else None  # not trained yet
for split, seed in (("heldout", 2), ("train", 3)):
    data = ScenesDataset(count, 32, seed=seed, split=split)
    items = [data[i] for i in range(count)]
    images, metadata = torch.stack([x["image"] for x in items]), [x["metadata"] for x in items]
    with torch.no_grad():
        pictures = {"original": images,
                    "KL-VAE": torch.cat([kl.decode_latents(kl.encode_latents(b)) for b in images.split(100)])}
        if vq is not None:
            pictures["VQ-VAE"] = torch.cat([vq.decode_codes(vq.encode_codes(b)) for b in images.split(100)])
    if split == "heldout":
        image_grid([(x[i], f"{name}: {items[i]['captions'][0][11:]}" if name == "original" else name)
                    for i in range(12) for name, x in pictures.items()], columns=6).save(root / "reconstructions.png")
    print(f"\n{split} scenes, {count} pictures: share right by GenEval's rules\n")
    print("| pictures | " + " | ".join(TASKS) + " | overall |\n|---|" + "---|" * (len(TASKS) + 1))
    for name, x in pictures.items():
        score = GenEvalScore()
        score.update(x, metadata)
        rates = score.compute()
        print(f"| {name} | " + " | ".join(f"{rates[t]:.3f}" for t in TASKS) + f" | {rates['overall']:.3f} |")
