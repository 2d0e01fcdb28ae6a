"""Pipelines: what rag_app does with the components (ingest documents, answer questions)."""
