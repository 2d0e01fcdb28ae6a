"""``rag-app serve``: one long-lived process holding the models and the index, answering
over an OpenAI-compatible API (``/v1``), MCP (``/mcp``) and a web page (``/``).

Layout: :mod:`.service` holds the models, the collections and the admission gate;
:mod:`.openai_api` the ``/v1`` routes; :mod:`.mcp_tools` the MCP tools; :mod:`.auth` the
API keys; :mod:`.app` puts them together (:func:`create_app`); :mod:`.client` is the
client of all this that ``rag-app query --server`` and ``rag-app mcp --server`` use.
Nothing here is imported by ``rag-app --help``.
"""
