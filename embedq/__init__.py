"""embedq: bulk text embedding over Redis streams, exactly once, into Parquet."""

__version__ = "0.1.0"
