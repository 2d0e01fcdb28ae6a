"""One module per swappable part, each built from :class:`rag_app.config.RagConfig`."""
