"""FID floors of the two image pipelines: 64 real images against 64 other real ones, and against the KL-VAE's and
the VQ-VAE's reconstructions of those (three draws). Usage: python data/sweeps/micro/fid_floor.py [sweep output]"""
import statistics
import sys

import torch

from transfusion.data.embedded.shapes import ShapesDataset
from transfusion.evaluation.fid import inception_fid
from transfusion.lightning.autoencoder import AutoencoderModule, VQAutoencoderModule, load_frozen
from transfusion.lightning.evaluation import to_uint8
root = (sys.argv[1] if len(sys.argv) > 1 else "outputs/sweeps/micro").rstrip("/") + "/"
kl = load_frozen(AutoencoderModule, root + "autoencoder/logs/version_0/checkpoints/last.ckpt")
vq = load_frozen(VQAutoencoderModule, root + "vqvae/logs/version_0/checkpoints/last.ckpt")
res = {"real": [], "kl": [], "vq": []}
for seed in range(3):
    a = torch.stack([ShapesDataset(64, 32, seed=100 + seed)[i]["image"] for i in range(64)])
    b = torch.stack([ShapesDataset(64, 32, seed=200 + seed)[i]["image"] for i in range(64)])
    with torch.no_grad():
        recs = {"real": b, "kl": kl.decode_latents(kl.encode_latents(b)), "vq": vq.decode_codes(vq.encode_codes(b))}
    for k, x in recs.items():
        fid = inception_fid()
        fid.update(to_uint8(a), real=True); fid.update(to_uint8(x), real=False)
        res[k].append(float(fid.compute()))
for k, v in res.items():
    print(f"{k:5s} FID vs 64 other real images: " + ", ".join(f"{x:.1f}" for x in v) + f"  mean {statistics.mean(v):.1f}")
