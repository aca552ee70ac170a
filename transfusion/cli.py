"""The ``transfusion`` command.

``transfusion fit|validate|test|predict --config lightning_configs/X.yaml`` is a LightningCLI: the model
and data classes are chosen by ``class_path`` in the YAML. More subcommands:

* ``transfusion tokenizer --output PATH``: train the SentencePiece tokenizer on the embedded text;
* ``transfusion quickstart --output DIR``: the whole embedded pipeline (see ``transfusion.quickstart``);
* ``transfusion fid-weights``: the InceptionV3 weights for FID, made offline (see ``transfusion.evaluation.fid``);
* ``transfusion consolidate CKPT_DIR [--output FILE]``: one ``.ckpt`` file from an FSDP2 checkpoint directory.
"""

from __future__ import annotations

import argparse
import sys

import transfusion  # noqa: F401  (torchvision shim before lightning)
from lightning.pytorch.cli import LightningCLI
import lightning as L


# settings that change how a trained model samples, not what it is: with --ckpt_path, Lightning replaces the
# model's arguments by the checkpoint's hyper-parameters; these keep the values of the config / command line
GENERATION_SETTINGS = ("cfg_scale", "num_inference_steps", "sampler", "max_new_tokens", "temperature", "top_p",
                       "clip_x0", "generation_seed")


class TransfusionCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        init_args = self.config[subcommand].get("model.init_args") if subcommand else None
        kept = {k: init_args[k] for k in GENERATION_SETTINGS if init_args is not None and k in init_args}
        super()._parse_ckpt_path()
        for key, value in kept.items():
            self.config[subcommand]["model.init_args"][key] = value


def cli_main(args: list[str] | None = None, run: bool = True) -> TransfusionCLI:
    """Run the LightningCLI on ``args`` (None: the command line)."""
    if args is None:
        return TransfusionCLI(run=run)
    argv, sys.argv = sys.argv, sys.argv[:1]  # in-process call: the outer command line is not ours to parse
    try:
        return TransfusionCLI(args=args, run=run)
    finally:
        sys.argv = argv


def tokenizer_main(argv: list[str]) -> None:
    from transfusion.data.shapes import all_captions
    from transfusion.data.text import read_documents, sentences, split_documents
    from transfusion.data.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="transfusion tokenizer", description="Train a SentencePiece tokenizer "
                                     "on the embedded captions and the training split of a text corpus.")
    parser.add_argument("--output", required=True, help="where to write the .model file")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--text_path", default=None, help="one-document-per-line corpus (default: embedded)")
    args = parser.parse_args(argv)
    train_docs, _ = split_documents(read_documents(args.text_path))
    tok = Tokenizer.train(sentences(train_docs) + all_captions(), args.output, vocab_size=args.vocab_size)
    print(f"wrote {args.output}: {tok.vocab_size} ids (bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}, "
          f"boi {tok.boi_id}, eoi {tok.eoi_id})")


def consolidate_main(argv: list[str]) -> None:
    from transfusion.lightning.parallel import consolidate_checkpoint

    parser = argparse.ArgumentParser(prog="transfusion consolidate", description="Turn a sharded (FSDP2) "
                                     "checkpoint directory into one .ckpt file that any strategy can load.")
    parser.add_argument("checkpoint", help="the directory written by FSDP2Strategy (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("--output", default=None, help="default: CHECKPOINT.consolidated.ckpt next to it")
    args = parser.parse_args(argv)
    output = args.output or str(args.checkpoint).rstrip("/") + ".consolidated.ckpt"
    print(f"wrote {consolidate_checkpoint(args.checkpoint, output)}")


def main(argv: list[str] | None = None) -> None:
    command_line = argv is None  # keep sys.argv intact then: DDP launchers re-run this command from it
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "tokenizer":
        tokenizer_main(argv[1:])
    elif argv and argv[0] == "quickstart":
        from transfusion.quickstart import quickstart_main

        quickstart_main(argv[1:])
    elif argv and argv[0] == "fid-weights":
        from transfusion.evaluation.fid import main as fid_weights_main

        fid_weights_main(argv[1:])
    elif argv and argv[0] == "consolidate":
        consolidate_main(argv[1:])
    else:
        cli_main(None if command_line else argv)


if __name__ == "__main__":
    main()
