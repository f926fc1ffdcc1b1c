"""``python -m partitioner``: the autopart command line (for torchrun's ``-m`` and source checkouts)."""

from .cli import entry

entry()
