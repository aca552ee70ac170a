"""``transfusion shards``: write the data of a ``transfusion fit`` config (or a JSONL of interleaved documents) as
shard sets, or the ``index.json`` of foreign shards; the command line of ``transfusion.data.shards.write``."""

from __future__ import annotations

import argparse
import posixpath
import sys

import torch

from transfusion.data.shards import format as fmt
from transfusion.data.shards import write
from transfusion.data.shards.write import IMAGE_FORMATS, Encoder, split_records, summary, write_splits


def add_writer_options(parser: argparse.ArgumentParser, kind: str = "webdataset") -> None:
    parser.add_argument("--output", required=True, help="folder or fsspec URL; gets train/ and validation/ shard sets")
    parser.add_argument("--format", default=kind, choices=fmt.KINDS, help="WebDataset tar or Parquet shards")
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards (the bytes do not depend on it)")
    parser.add_argument("--shuffle", action="store_true", help="store the records in a seeded random order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_format", default="png", choices=tuple(IMAGE_FORMATS), help="webp: lossless")
    parser.add_argument("--batch_size", type=int, default=64, help="images per autoencoder batch (--encode)")
    parser.add_argument("--overwrite", action="store_true", help="replace shard sets already at --output")


def write_config_shards(argv: list[str], args, encode: bool, content: str | None = None) -> dict:
    """Build the model and data of the `transfusion fit` arguments ``argv`` and write their splits (or the
    ``--documents`` / ``--val_documents`` JSONL files, at the model's image size)."""
    from transfusion.cli import cli_main

    cli = cli_main(argv, run=False)
    module, data = cli.model, cli.datamodule
    if getattr(args, "documents", None):
        if not hasattr(module, "sequence_layout"):
            raise ValueError(f"shards needs a Transfusion or Chameleon model config, got {type(module).__name__}")
        from transfusion.data.shards.document_records import JsonlDocuments

        size = module.sequence_layout().image_size
        records = {"train": JsonlDocuments(args.documents, size)}
        if args.val_documents:
            records["validation"] = JsonlDocuments(args.val_documents, size)
    else:
        records = split_records(data, module, content)
    encoder = None
    if encode and next(iter(records.values())).content != "text":
        if not hasattr(module, "autoencoder"):
            raise ValueError(f"--encode needs a model with a frozen autoencoder, got {type(module).__name__}")
        if torch.cuda.is_available():
            module.autoencoder.cuda()
        encoder = Encoder(module.autoencoder, args.batch_size)
    indexes = write_splits(records, args.output, overwrite=args.overwrite, kind=args.format,
                           samples_per_shard=args.samples_per_shard, workers=args.workers, shuffle=args.shuffle,
                           seed=args.seed, image_format=args.image_format, encoder=encoder,
                           image_size=module.sequence_layout().image_size)
    for split, index in indexes.items():
        print(summary(posixpath.join(args.output.rstrip("/"), split), index))
    return indexes


def shards_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="transfusion shards", description=write.__doc__.split("\n\n")[0] + " Other "
                                     "arguments are the config and overrides of `transfusion fit`.")
    try:
        if "--index" in argv:
            index_main(parser, argv)
            return
        add_writer_options(parser)
        parser.add_argument("--encode", action="store_true", help="store images as the model's latents / VQ codes")
        parser.add_argument("--content", default=None, choices=fmt.CONTENTS,
                            help="default: the stories of a story config, else the image-caption pairs, or the text "
                                 "when the data has no images")
        parser.add_argument("--documents", default=None, help="write this JSONL of interleaved documents "
                            '({"segments": [...], "images": [paths]}) to OUTPUT/train instead of the config\'s data')
        parser.add_argument("--val_documents", default=None, help="with --documents: a JSONL for OUTPUT/validation")
        args, rest = parser.parse_known_args(argv)
        if not rest:
            parser.error("give the config of a `transfusion fit` run (--config X.yaml [overrides])")
        write_config_shards(rest, args, args.encode, args.content)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"transfusion shards: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


def index_main(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    from transfusion.data.shards.foreign import write_foreign_index

    parser.add_argument("--index", required=True, help="a shard folder, URL or glob (tar or Parquet shards)")
    parser.add_argument("--output", default=None, help="where index.json goes (default: the shards' folder)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    url, index = write_foreign_index(args.index, args.output, args.overwrite)
    print(f"wrote {url}: {sum(s['samples'] for s in index['shards'])} {index['content']} records in "
          f"{len(index['shards'])} {index['kind']} shards")
