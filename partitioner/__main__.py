"""``python -m partitioner``: the ``autopart`` command line, for a checkout that is not installed."""

from .cli import main

raise SystemExit(main())
