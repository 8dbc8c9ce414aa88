"""`python -m keytrio`: the same as the `keytrio` command."""

import sys

from keytrio.actors.cli import main

sys.exit(main())
