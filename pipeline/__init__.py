"""VL-Atlas pipeline: a vision-language model over an image-text dataset -> Parquet lake."""

__version__ = "0.1.0"
