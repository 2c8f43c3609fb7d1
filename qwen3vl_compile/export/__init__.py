"""Export of each graph kind (vision buckets, embedding, text decoder)."""
