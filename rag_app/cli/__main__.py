"""``python -m rag_app.cli``: the same as the ``rag-app`` command."""

import sys

from rag_app.cli import main

sys.exit(main())
