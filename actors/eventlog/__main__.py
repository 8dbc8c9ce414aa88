"""``python -m keytrio.actors.eventlog FILE ...``: the same as ``keytrio eventlog``, without loading the servers."""

import sys

from keytrio.actors.eventlog.cli import run

sys.exit(run())
