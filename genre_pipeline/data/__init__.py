"""Data: the catalogue contract and MovieLens ingestion, storage, poster fetching, image decoding."""
