"""genre_pipeline: label a movie catalogue with genres from its posters (Ray Train + Ray Data)."""

__version__ = "0.1.0"
