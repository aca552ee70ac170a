"""Shards: streamed image-text data (WebDataset tar / Parquet, local or on object storage) and their writer."""
