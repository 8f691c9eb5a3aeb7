"""ltssl: self-supervised learning on long-tailed image data, from LT datasets to one results parquet."""

__version__ = "0.1.0"
