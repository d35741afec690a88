"""Text -> image: prompt tokenization and encoding (pipelines arrive with the sampling issue)."""
