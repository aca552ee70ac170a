"""Write the legacy fixtures of ``tests/test_legacy_formats.py`` with the code before issue 28 (main at 7a332c2).

Files as a user of that code made them, through its public command and API: a tokenizer (``transfusion
tokenizer``), a KL autoencoder and a VQ-VAE (``transfusion fit``, 2 steps, saved weights-only), Transfusion and
Chameleon checkpoints (``transfusion fit`` of the shipped embedded configs, 2 steps: optimizer state, the flat
sampling hyper-parameters ``cfg_scale`` / ``num_steps`` of the time, an EMA for Transfusion) and their
``save_pretrained`` folders (``transfusion export``); ``transfusion predict`` outputs; and ``reference.pt``: what the
old code computes from each module on fixed inputs (tokens, text logits, validation losses, latents and codes,
denoising predictions, greedy captions, images for fixed seeds), in float64.

Checkpoints hold the tokenizer and autoencoder paths relative to the repository root, as a run from there writes
them. Run it from the root of this repository with the old code first on the path::

    git worktree add --detach /tmp/transfusion_7a332c2 7a332c2
    PYTHONPATH=/tmp/transfusion_7a332c2 python tests/data/legacy/make_legacy.py

Written at 7a332c2 on 2026-12-07 (2-core CPU, torch 2.13.0, lightning 2.6.6).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path("tests/data/legacy")  # relative: the checkpoints' hyper-parameters hold these paths
TOKENIZER, AUTOENCODER, VQVAE = HERE / "tokenizer.model", HERE / "autoencoder.ckpt", HERE / "vqvae.ckpt"
PROMPTS = HERE / "prompts.jsonl"
TRANSFORMER = '{"n_layers": 1, "dim": 16, "n_heads": 2}'  # the debug preset, smaller: the fixture stays small
TEXTS = ["a red circle", "the market fell"]
CAPTIONS = ["a small red circle in the top left", "a big blue square"]
SEEDS = [3, 4]


def command(*args: str) -> None:
    """The old `transfusion` command in a fresh process (as a user runs it); -P: not this tree's package from cwd."""
    subprocess.run([sys.executable, "-P", "-m", "transfusion.cli", *args], check=True)


def small_tokenizer(path: Path) -> None:
    """Drop the normalizer's precompiled NFKC table (240 of the model's 245 kB; NFKC leaves the ASCII texts here
    unchanged) so that the three copies of the tokenizer (one per export) stay small; before anything uses it."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(path.read_bytes())
    model.normalizer_spec.name, model.normalizer_spec.precompiled_charsmap = "identity", b""
    path.write_bytes(model.SerializeToString())


def fit(config: Path, root: Path, *overrides: str) -> Path:
    """2 steps of ``transfusion fit --config config``; the ``last.ckpt`` its checkpoint callback wrote."""
    command("fit", "--config", str(config), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root), *overrides)
    return next(root.rglob("last.ckpt"))


def weights_only(ckpt: Path, output: Path) -> None:
    """An autoencoder checkpoint without optimizer and loop state (the keys Lightning writes with
    ``weights_only=True``): what a Transfusion or Chameleon module reads of it."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    keep = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "hparams_name", "hyper_parameters")
    torch.save({k: v for k, v in checkpoint.items() if k in keep}, output)


def batches(module, datamodule_args: dict) -> dict:
    """The first training and validation rows of the embedded data for this module (train ones carry row_index)."""
    from transfusion.data.datamodule import TransfusionDataModule

    dm = TransfusionDataModule(**datamodule_args, batch_size=3, num_workers=0, val_rows=3,
                               layout=module.sequence_layout())
    dm.setup("fit")
    return {"train": next(iter(dm.train_dataloader())), "val": next(iter(dm.val_dataloader()))}


def text_rows(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TEXTS as text-only rows: tokens (B, L) from BOS, padded; doc_ids (B, L), -1 at padding; the valid positions."""
    tok = module.tokenizer
    ids = [[tok.bos_id, *tok.encode(text)] for text in TEXTS]
    L = max(map(len, ids))
    tokens = torch.tensor([row + [tok.pad_id] * (L - len(row)) for row in ids])
    doc_ids = torch.tensor([[0] * len(row) + [-1] * (L - len(row)) for row in ids])
    return tokens, doc_ids, doc_ids >= 0


@torch.no_grad()
def references(module, rows: dict, kind: str) -> dict:
    """What the module computes in float64 on fixed inputs; ``kind``: "transfusion" or "chameleon"."""
    module = module.double().eval()
    tokens, doc_ids, at = text_rows(module)
    out = {"texts": TEXTS, "tokens": tokens, "doc_ids": doc_ids, "text_logits": module.text_logits(tokens, doc_ids, at),
           "rows": rows, "val_loss": {k: module.validation_step(rows[k], 0) for k in rows}}
    images = rows["val"]["images"][:2].double()
    out["images"] = images
    if kind == "transfusion":
        latents = module.encode_images(images)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype)
        t = torch.tensor([10, 700])
        x_t = module.model.diffusion.add_noise(latents, noise, t)
        batch = rows["val"]
        n = module.positions_per_image
        keep = int((batch["image_ids"][0] >= 0).sum()) // n  # the images of the first row
        first = {k: batch[k][:1] for k in ("tokens", "doc_ids", "image_ids")}
        lat_row = module.encode_images(batch["images"][:keep].double())
        x_row = module.model.diffusion.add_noise(lat_row, torch.randn(lat_row.shape, generator=g, dtype=torch.float64),
                                                 t[:keep])
        _, prediction = module.model(first["tokens"], first["doc_ids"], first["image_ids"], x_row, t[:keep])
        out.update(latents=latents, noise=noise, t=t, x_t=x_t, denoise={"row": first, "x_t": x_row, "t": t[:keep],
                                                                        "prediction": prediction})
    else:
        out["codes"] = module.autoencoder.encode_codes(images)
    # the module's own token budget: the old generate_captions put its default of 32 in place of it (issue 28)
    out["captions"] = module.generate_captions(images, SEEDS, max_new_tokens=module.sampling.max_new_tokens)
    out["generated"] = module.generate_images(CAPTIONS, SEEDS)
    out["sampling"] = {k: v for k, v in vars(module.sampling).items()}
    return out


def main() -> None:
    import transfusion
    from transfusion.lightning.chameleon import ChameleonModule
    from transfusion.lightning.transfusion import TransfusionModule

    old = Path(transfusion.__file__).resolve().parents[1]
    if old == Path.cwd().resolve():
        raise SystemExit("make_legacy.py: put the old code first on PYTHONPATH (see its docstring)")
    commit = subprocess.run(["git", "-C", str(old), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    configs = old / "lightning_configs"
    if HERE.exists():
        for path in HERE.iterdir():
            if path.name != "make_legacy.py":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    HERE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        command("tokenizer", "--output", str(TOKENIZER), "--vocab_size", "400")
        small_tokenizer(TOKENIZER)
        small_images = ["--model.init_args.preset", "debug", "--model.init_args.image_size", "16",
                        "--data.init_args.image_size", "16", "--data.init_args.batch_size", "4"]
        weights_only(fit(configs / "autoencoder_embedded.yaml", tmp / "ae", *small_images), AUTOENCODER)
        weights_only(fit(configs / "vqvae_embedded.yaml", tmp / "vq", *small_images,
                         "--model.init_args.codebook_size", "32"), VQVAE)
        data = ["--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4",
                "--data.init_args.num_workers", "0"]
        model = ["--model.init_args.tokenizer", str(TOKENIZER), "--model.init_args.preset", "debug",
                 "--model.init_args.transformer", TRANSFORMER, "--model.init_args.warmup_steps", "5"]
        ema = ["--trainer.callbacks+=transfusion.lightning.ema.EMA", "--trainer.callbacks.decay=0.9"]
        shutil.copy(fit(configs / "transfusion_embedded.yaml", tmp / "tf", *model, *data, *ema,
                        "--model.init_args.autoencoder", str(AUTOENCODER), "--model.init_args.num_steps", "4",
                        "--model.init_args.max_new_tokens", "6"), HERE / "transfusion.ckpt")
        shutil.copy(fit(configs / "chameleon_embedded.yaml", tmp / "ch", *model, *data,
                        "--model.init_args.autoencoder", str(VQVAE), "--model.init_args.max_new_tokens", "6"),
                    HERE / "chameleon.ckpt")
    for name in ("transfusion", "chameleon"):
        command("export", "--ckpt_path", str(HERE / f"{name}.ckpt"), "--output", str(HERE / name))

    # predict through the command, on a prompt file (caption -> image, image -> caption, a story segment)
    from transfusion.data.shapes import ShapesDataset
    from transfusion.images import to_pil

    to_pil(ShapesDataset(1, 16, seed=9)[0]["image"]).save(HERE / "shape.png")
    PROMPTS.write_text(json.dumps({"prompt": CAPTIONS[0], "generate": "image"}) + "\n"
                       + json.dumps({"image": "shape.png", "max_new_tokens": 4}) + "\n"
                       + json.dumps({"segments": [CAPTIONS[1], "<image>"], "max_new_tokens": 2}) + "\n")
    for name in ("transfusion", "chameleon"):
        command("predict", "--config", str(configs / f"{name}_embedded.yaml"),
                "--config", str(configs / f"{name}_embedded_predict.yaml"), *data,
                *(["--model.init_args.num_steps", "4"] if name == "transfusion" else []),  # kept over the ckpt's
                "--ckpt_path", str(HERE / f"{name}.ckpt"), "--data.init_args.prompts", str(PROMPTS),
                "--trainer.callbacks.init_args.output_dir", str(HERE / f"{name}_predict"))

    reference = {"commit": commit}
    for name, cls in (("transfusion", TransfusionModule), ("chameleon", ChameleonModule)):
        module = cls.load_from_checkpoint(HERE / f"{name}.ckpt", map_location="cpu")
        hp = module.hparams
        rows = batches(module, {"seq_len": 64, "text_ratio": 0.25, "image_first_max_t": 100 if name == "transfusion"
                                else None})
        reference[name] = references(module, rows, name)
        reference[name]["weights_source"] = getattr(module, "weights_source", "raw")
        folder = cls.from_pretrained(HERE / name)  # the export: the same module, the same outputs
        folder_out = references(folder, rows, name)
        assert torch.equal(folder_out["text_logits"], reference[name]["text_logits"]), name
        assert folder_out["captions"] == reference[name]["captions"], name
        assert torch.equal(folder_out["generated"], reference[name]["generated"]), name
        assert hp.get("cfg_scale") is not None, "the old checkpoint holds the flat sampling keys"
    torch.save(reference, HERE / "reference.pt")
    print(f"wrote {HERE} at {commit}")


if __name__ == "__main__":
    main()
