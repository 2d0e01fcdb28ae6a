"""Load a folder of documents into Milvus: ``python scripts/ingest.py PATH [--config FILE]``.

The same as ``rag-app ingest PATH``.
"""

import sys

from rag_app.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
