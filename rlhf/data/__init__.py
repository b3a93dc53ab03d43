"""Data builders: preference pairs for the LLM track, the seed's CSVs for the tabular track."""
