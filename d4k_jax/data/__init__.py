"""Data: the Aesthetic-4K TFDS builder, the grain input pipeline, the text-embedding cache, and the
embedded demo set and pipeline."""
