"""Shards: streamed image-text data (WebDataset tar / Parquet, local or on object storage) and their writer; the
DataModule that reads them is ``transfusion.data.modules.streaming.StreamingDataModule``."""

from transfusion.data import moved

__getattr__ = moved.renamed_names(__name__)  # StreamingDataModule, here before
