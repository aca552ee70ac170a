"""The ``transfusion`` command.

``transfusion fit|validate|test|predict --config lightning_configs/X.yaml`` is a LightningCLI: the model
and data classes are chosen by ``class_path`` in the YAML. More subcommands:

* ``transfusion tokenizer --output PATH [--text_files ... | --hub NAME] [--captions_from DIR ...]``: train the
  SentencePiece tokenizer on a text source (default: the embedded text);
* ``transfusion quickstart --output DIR``: the whole embedded pipeline (see ``transfusion.quickstart``);
* ``transfusion shards --config X.yaml --output DIR``: write a config's data as WebDataset / Parquet shard sets
  (see ``transfusion.data.shards.write``); ``cache-latents`` is its ``--encode`` case
  (``transfusion.data.sources.latent_cache``);
* ``transfusion fid-weights``: the InceptionV3 weights for FID, made offline (see ``transfusion.evaluation.fid``);
* ``transfusion sweep --config lightning_configs/sweep_micro.yaml``: Transfusion vs Chameleon (``transfusion.sweep``);
* ``transfusion consolidate CKPT_DIR [--output FILE]``: one ``.ckpt`` file from an FSDP2 checkpoint directory.
* ``transfusion export --ckpt_path CKPT --output DIR``: weights as safetensors with the config beside them
  (see ``transfusion.export``).

Checkpoints are written atomically (``AtomicCheckpointIO``) unless the trainer is given another
CheckpointIO; ``fit --ckpt_path last`` finds the newest ``last*.ckpt`` of earlier runs (other logger
versions) in the checkpoint folders; ``fit --ckpt_path`` builds the model from the config given and
names every architecture field that differs from the checkpoint's (``validate|test|predict`` take the
model's arguments from the checkpoint); an invalid option stops the command before any data is read,
with a one-line message naming it.

Errors: a user error (``transfusion.errors``: a bad option, file or record) ends the command with one line,
``transfusion <subcommand>: error: <message>``, and exit status 2; other errors are internal and keep their
traceback. ``--debug`` (anywhere on the command line) or ``TRANSFUSION_DEBUG=1`` shows the traceback of user
errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# The command's process-wide settings, made before torch loads OpenMP (which reads the variable once): idle
# OpenMP threads sleep instead of spinning. On small CPU machines a spinning pool next to a data worker or
# another process slowed training steps down up to 30x. Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transfusion._torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # before lightning -> torchmetrics -> torchvision

from lightning.fabric.plugins import CheckpointIO  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
import lightning as L  # noqa: E402

from transfusion.errors import UserError, check_checkpoint_file, one_line, user_error  # noqa: E402
from transfusion.generation.options import ChameleonSamplingOptions, SamplingOptions, legacy_fields  # noqa: E402
from transfusion.lightning.checkpoint import AtomicCheckpointIO  # noqa: E402
from transfusion.lightning.lost_rank import LOST_RANKS, LostRankReport  # noqa: E402
from transfusion.lightning.preemption import PreemptionCheckpoint  # noqa: E402


class ConfigError(SystemExit):
    """An invalid option: reported in one line, exit status 2 (as for a parse error)."""


# settings that change how a trained model samples, not what it is: with --ckpt_path (validate, test, predict),
# Lightning replaces the model's arguments by the checkpoint's hyper-parameters; these keep the values of the
# config / command line (the deprecated flat sampling arguments too: a checkpoint's would override the group)
KEPT_SETTINGS = ("sampling", "generation_seed",
                 "eval_weights",  # which weights of a checkpoint with EMAs (transfusion.lightning.ema)
                 *dict.fromkeys(legacy_fields(SamplingOptions) + legacy_fields(ChameleonSamplingOptions)))
# files a checkpoint names by path: where they are missing, the config's own (when it exists) is used
MOVABLE_FILES = ("tokenizer", "autoencoder")


class TransfusionCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        argv = kwargs["args"] if kwargs.get("args") is not None else sys.argv[1:]
        if isinstance(argv, list) and argv and argv[0] in LightningCLI.subcommands():
            # a parser for the subcommand given only (each one signature-parses the Trainer: ~0.3 s of a start-up)
            self.subcommands = lambda: {argv[0]: LightningCLI.subcommands()[argv[0]]}
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def instantiate_classes(self) -> None:
        try:  # module and data module constructors check their options; nothing is read yet
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as error:
            cause = error  # jsonargparse wraps the constructor's error in its own: report the original
            while isinstance(inner := _inner(cause), (ValueError, FileNotFoundError)):
                cause = inner
            print(f"transfusion {self.subcommand}: error: {cause}", file=sys.stderr)
            raise ConfigError(2) from error
        # Lightning requires options that model and data share to agree, but finds out only after setup
        model_hp, data_hp = getattr(self.model, "hparams", {}), getattr(self.datamodule, "hparams", {})
        clash = [f"model.init_args.{k}={model_hp[k]!r} but data.init_args.{k}={data_hp[k]!r}"
                 for k in sorted(set(model_hp) & set(data_hp)) if not k.startswith("_") and model_hp[k] != data_hp[k]]
        if clash:
            print(f"transfusion {self.subcommand}: error: model and data disagree: {'; '.join(clash)}", file=sys.stderr)
            raise ConfigError(2)

    def _set_seed(self) -> None:
        try:  # numpy's bounds error names neither the option nor the value's origin
            super()._set_seed()
        except (ValueError, TypeError) as error:
            raise UserError(f"seed_everything: {error}") from error

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer", default={})
        plugins = trainer.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        defaults = [LostRankReport()]  # a rank that dies or hangs is named (transfusion.lightning.lost_rank)
        if trainer.get("enable_checkpointing") is not False:
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                defaults.append(ModelCheckpoint())  # Lightning's default, which it leaves out beside another Checkpoint
            defaults.append(PreemptionCheckpoint())  # SIGTERM: save last.ckpt at the step's end, then stop
        kwargs["callbacks"] = callbacks + [d for d in defaults if not any(type(c) is type(d) for c in callbacks)]
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, TypeError, ValueError) as error:  # the Trainer checks its own options
            if user_error(error) is not None:
                raise
            raise UserError(f"invalid trainer option: {' '.join(str(error).split())}") from error

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = find_last_checkpoint(self.trainer)  # None (with a warning): a fresh start

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):  # a truncated copy: name the file, not torch's zip
            check_checkpoint_file(self.config[subcommand]["ckpt_path"])
        if subcommand == "fit":  # resuming: the config given builds the model; on_load_checkpoint names mismatches
            return
        init_args = self.config[subcommand].get("model.init_args") if subcommand else None
        kept = {k: init_args[k] for k in KEPT_SETTINGS if init_args is not None and k in init_args}
        given = {k: init_args[k] for k in MOVABLE_FILES if init_args is not None and isinstance(init_args.get(k), str)}
        super()._parse_ckpt_path()
        for key, value in kept.items():
            self.config[subcommand]["model.init_args"][key] = value
        for key, path in given.items():  # a checkpoint moved to another machine: its files, where the config has them
            recorded = self.config[subcommand]["model.init_args"].get(key)
            if isinstance(recorded, str) and recorded != path and not os.path.exists(recorded) and os.path.exists(path):
                print(f"transfusion {subcommand}: the checkpoint's {key} {recorded} does not exist here; using the "
                      f"config's {path}", file=sys.stderr)
                self.config[subcommand]["model.init_args"][key] = path


def _inner(error: BaseException) -> BaseException | None:
    return error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def find_last_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest ``last*.ckpt`` of any run that wrote to this trainer's checkpoint folders.

    Lightning looks for ``last`` only in the folder of the *new* logger version, so a resumed run
    would silently start from scratch.
    """
    folders = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            folders.append(Path(callback.dirpath))
    if trainer.loggers:
        logger = trainer.loggers[0]
        root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
        folders += sorted(root.glob("*/checkpoints"))
    folders.append(Path(trainer.default_root_dir) / "checkpoints")
    # a file, or the folder of shards that FSDP2 writes (torch.distributed.checkpoint: .metadata inside)
    found = [p for folder in folders for p in folder.glob("last*.ckpt") if p.is_file() or (p / ".metadata").is_file()]
    if not found:
        print(f"transfusion fit: --ckpt_path last: no last*.ckpt under {', '.join(map(str, folders))}; "
              "starting from scratch", file=sys.stderr)
        return None
    return str(max(found, key=lambda p: p.stat().st_mtime))


def check_config_files(args: list[str]) -> None:
    """A ``--config`` file that is not UTF-8 text is a UserError naming it (jsonargparse would raise a codec error)."""
    for i, arg in enumerate(args):
        path = arg.partition("=")[2] if arg.startswith(("--config=", "-c=")) else \
            args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else None
        if path and os.path.isfile(path):
            try:
                Path(path).read_bytes().decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"config file {path}: invalid UTF-8 at byte {error.start}") from error


def cli_main(args: list[str] | None = None, run: bool = True) -> TransfusionCLI:
    """Run the LightningCLI on ``args`` (None: the command line)."""
    check_config_files(sys.argv[1:] if args is None else args)
    if args is None:
        return TransfusionCLI(run=run)
    argv, sys.argv = sys.argv, sys.argv[:1]  # in-process call: the outer command line is not ours to parse
    try:
        return TransfusionCLI(args=args, run=run)
    finally:
        sys.argv = argv


def tokenizer_main(argv: list[str]) -> None:
    import itertools

    from transfusion.data.embedded.shapes import all_captions
    from transfusion.data.embedded.text import read_documents, sentences, split_documents
    from transfusion.data.sources import HubTextSource, ImageFolderSource, TextFilesSource
    from transfusion.data.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="transfusion tokenizer", description="Train a SentencePiece tokenizer "
                                     "(BOS, EOS, PAD, BOI, EOI reserved) on the training split of a text source and "
                                     "captions; by default the embedded news text and shapes captions.")
    parser.add_argument("--output", required=True, help="where to write the .model file")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
    parser.add_argument("--text_path", default=None, help="one-document-per-line corpus (default: embedded)")
    parser.add_argument("--text_files", nargs="+", default=None, help="text/JSONL/Parquet files or globs (datasets)")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--hub", default=None, help="a Hub text dataset, e.g. allenai/c4 (needs network)")
    parser.add_argument("--hub_config", default=None)
    parser.add_argument("--streaming", action="store_true", help="stream the Hub dataset")
    parser.add_argument("--captions_from", nargs="*", default=None,
                        help="image folders (metadata.jsonl/csv) whose captions are added; none: the shapes captions")
    parser.add_argument("--max_documents", type=int, default=200_000, help="documents read from the text source")
    args = parser.parse_args(argv)
    if args.text_files or args.hub:
        source = (TextFilesSource(args.text_files, text_column=args.text_column) if args.text_files else
                  HubTextSource(args.hub, config=args.hub_config, text_column=args.text_column, streaming=args.streaming))
        documents = list(itertools.islice(source.documents("train"), args.max_documents))
    else:
        documents, _ = split_documents(read_documents(args.text_path))
    if args.captions_from is None:
        captions = all_captions()
    else:
        captions = [c for folder in args.captions_from for row in ImageFolderSource(folder).load("train")
                    for c in row["captions"]]
    tok = Tokenizer.train(sentences(documents) + captions, args.output, vocab_size=args.vocab_size,
                          model_type=args.model_type)
    print(f"wrote {args.output}: {tok.vocab_size} ids (bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}, "
          f"boi {tok.boi_id}, eoi {tok.eoi_id}) from {len(documents)} documents and {len(captions)} captions")


def consolidate_main(argv: list[str]) -> None:
    from transfusion.lightning.parallel import consolidate_checkpoint

    parser = argparse.ArgumentParser(prog="transfusion consolidate", description="Turn a sharded (FSDP2) "
                                     "checkpoint directory into one .ckpt file that any strategy can load.")
    parser.add_argument("checkpoint", help="the directory written by FSDP2Strategy (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("--output", default=None, help="default: CHECKPOINT.consolidated.ckpt next to it")
    args = parser.parse_args(argv)
    output = args.output or str(args.checkpoint).rstrip("/") + ".consolidated.ckpt"
    print(f"wrote {consolidate_checkpoint(args.checkpoint, output)}")


def cache_latents_main(argv: list[str]) -> None:
    """`transfusion shards --encode --format parquet` under its earlier name and flags."""
    from transfusion.convert import add_writer_options, write_config_shards
    from transfusion.data.sources import latent_cache

    parser = argparse.ArgumentParser(prog="transfusion cache-latents", description=latent_cache.__doc__.split("\n\n")[0] +
                                     " Other arguments are the config and overrides of `transfusion fit`.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_writer_options(parser, kind="parquet")
    parser.add_argument("--encode_workers", type=int, default=0, help="processes decoding images (as --workers)")
    args, rest = parser.parse_known_args(argv)
    args.workers = max(args.workers, args.encode_workers)
    try:
        write_config_shards(rest, args, encode=True, content="pairs")
    except (ValueError, FileExistsError) as error:
        print(f"transfusion cache-latents: error: {error}", file=sys.stderr)
        raise ConfigError(2) from error


# the subcommands besides LightningCLI's: name -> (module, function taking the remaining arguments), imported on use
SUBCOMMANDS = {
    "tokenizer": ("transfusion.cli", "tokenizer_main"),
    "cache-latents": ("transfusion.cli", "cache_latents_main"),
    "shards": ("transfusion.convert", "shards_main"),
    "export": ("transfusion.export", "export_main"),
    "quickstart": ("transfusion.quickstart", "quickstart_main"),
    "fid-weights": ("transfusion.evaluation.fid", "main"),
    "sweep": ("transfusion.sweep", "sweep_main"),
    "consolidate": ("transfusion.cli", "consolidate_main"),
}


def main(argv: list[str] | None = None) -> None:
    """The ``transfusion`` command: a user error ends in one line and exit status 2 (``--debug``: the traceback)."""
    command_line = argv is None  # keep sys.argv intact then: DDP launchers re-run this command from it
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("TRANSFUSION_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        debug, argv = True, [a for a in argv if a != "--debug"]
        if command_line:  # DDP children re-run sys.argv: they keep the setting through the environment
            sys.argv[1:] = argv
            os.environ["TRANSFUSION_DEBUG"] = "1"
    name = f"transfusion {argv[0]}" if argv and not argv[0].startswith("-") else "transfusion"
    try:
        if argv and argv[0] in SUBCOMMANDS:
            module, function = SUBCOMMANDS[argv[0]]
            getattr(importlib.import_module(module), function)(argv[1:])
        else:
            cli_main(None if command_line else argv)
    except Exception as error:
        lost = getattr(error, LOST_RANKS, None)  # a data-parallel rank died or hung: name it, not gloo's traceback
        if lost and not debug:
            print(f"{name}: error: {lost}", file=sys.stderr)
            raise SystemExit(1) from error
        cause = user_error(error)  # Lightning and jsonargparse may wrap it (raise ... from)
        if cause is None or debug:
            raise
        print(f"{name}: error: {one_line(cause)}", file=sys.stderr)
        leave_process_group()
        raise SystemExit(2) from error


def leave_process_group() -> None:
    """Close torch.distributed's process group before a user error ends a rank: left to the interpreter's exit,
    gloo's threads can abort the process (SIGABRT, "terminate called without an active exception") instead of
    letting it exit with status 2. Gloo's shutdown is local (no peer is waited for); NCCL's is left to the exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
