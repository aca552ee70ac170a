"""Shards: streamed image-text data (WebDataset tar / Parquet, local or on object storage) and their writer."""

from transfusion.data.shards.datamodule import StreamingDataModule  # noqa: F401
