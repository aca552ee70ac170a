"""The ``transfusion`` command.

``transfusion fit|validate|test|predict --config lightning_configs/X.yaml`` is a LightningCLI: the model
and data classes are chosen by ``class_path`` in the YAML. Two more subcommands:

* ``transfusion tokenizer --output PATH [--text_files ... | --hub NAME] [--captions_from DIR ...]``: train the
  SentencePiece tokenizer on a text source (default: the embedded text);
* ``transfusion quickstart --output DIR``: the whole embedded pipeline (see ``transfusion.quickstart``).
"""

from __future__ import annotations

import argparse
import sys

import transfusion  # noqa: F401  (torchvision shim before lightning)
from lightning.pytorch.cli import LightningCLI
import lightning as L


class TransfusionCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)


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
    import itertools

    from transfusion.data.shapes import all_captions
    from transfusion.data.sources import HubTextSource, ImageFolderSource, TextFilesSource
    from transfusion.data.text import read_documents, sentences, split_documents
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "tokenizer":
        tokenizer_main(argv[1:])
    elif argv and argv[0] == "quickstart":
        from transfusion.quickstart import quickstart_main

        quickstart_main(argv[1:])
    else:
        cli_main(argv)


if __name__ == "__main__":
    main()
