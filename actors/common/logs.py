"""``--log-level`` and ``--log-format text|json`` of the actor verbs, and the logging they set up.

Text: ``2026-12-03 15:04:05,123 INFO keytrio.verifier event=verifier.started ...`` (one event per
line). JSON: one object per line, ``{"ts", "level", "logger", "message"}`` plus ``"exc"`` with the
traceback when there is one, for log shippers.

Libraries that log every migration step or request at INFO (alembic, httpx, ...) are held at
WARNING unless the level is DEBUG: a service's INFO log is keytrio's own events. SQLAlchemy stays at
WARNING even then (its DEBUG echoes every statement and row of every poll).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from typing import Any

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
#: loggers of libraries whose INFO lines are chatter for an operator
CHATTY = ("alembic", "httpx", "httpcore", "hpack", "quart", "asyncio")
#: loggers held at WARNING even at DEBUG: SQLAlchemy at DEBUG echoes every statement and row
QUIET = ("sqlalchemy",)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_HANDLER = "keytrio-stderr"


def add_options(parser: argparse.ArgumentParser, *, default_level: str = "INFO") -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", default=default_level, type=str.upper, choices=LEVELS,
                       help=f"least severe level logged (default {default_level}; DEBUG includes libraries)")
    group.add_argument("--log-format", default="text", choices=FORMATS,
                       help="text (default) or json (one object per line)")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record (a test harness swaps it)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Route every log record to stderr at ``level`` in ``fmt``; replaces a handler an earlier call
    installed (and only that one: a test harness's handlers stay)."""
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name(_HANDLER)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER:
            root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric)
    library_level = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for name in CHATTY:
        logging.getLogger(name).setLevel(library_level)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def emit_failure(line: str, fmt: str, *, code: int) -> None:
    """The one stderr line of a failed start, in the log format (JSON keeps shippers parsing)."""
    if fmt == "json":
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        line = json.dumps({"ts": now, "level": "CRITICAL", "logger": "keytrio", "message": line,
                           "exit_code": code}, ensure_ascii=False)
    print(line, file=sys.stderr, flush=True)
