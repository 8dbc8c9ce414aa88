"""push verify.py's sorted JSON (the clock and PCR 10 stored on a pass) by one kept encoder: the
same text as ``json.dumps(value, sort_keys=True)``, which it replaced."""

from __future__ import annotations

import json

from keytrio.actors.verifier.push import verify


def test_dumps_sorted_equals_json_dumps_sort_keys() -> None:
    values = [{"clock": 1, "reset_count": 2, "restart_count": 0, "safe": True},
              {10: "ab" * 32, 0: "00" * 32, 7: "ff" * 32}, {"b": [1, {"z": 1, "a": None}], "a": 1.5, "é": "ü"}, {}, []]
    for value in values:
        assert verify._dumps_sorted(value) == json.dumps(value, sort_keys=True)
