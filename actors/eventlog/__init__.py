"""``keytrio eventlog``: an operator's dump of a UEFI event log (actors/eventlog/cli.py)."""
