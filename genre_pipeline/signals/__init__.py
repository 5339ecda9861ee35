"""Signals other than the poster: per-movie embeddings of titles and of who rated a movie, as versioned Parquet."""
