"""The bottom layer: where data lives and how it is read and written. The run store (atomic,
checksummed outputs and done markers), filesystems and object stores, and the one reader of source
shards (Parquet and WebDataset tars). Operators and the pipeline both use it; it imports neither."""
