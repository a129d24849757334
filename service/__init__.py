"""The HTTP API (FastAPI). Never imports torch: it sends tasks to workers by name."""
