"""Actor configuration: a TOML file plus ``KEYTRIO_<ACTOR>_<KEY>`` environment overrides.

Each actor declares its options once (name, type, default, help); loading validates every
value and reports *all* problems at once, one clear line each. Key names follow upstream
Keylime's where a concept is shared (DESIGN.md "Conventions").
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the value of a ``float_or_auto`` option that lets the actor derive it (0 is a value of its own)
AUTO = "auto"


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Option:
    name: str
    kind: str  # str | int | float | float_or_auto | bool | list | path | choice | int_or_str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[Any], str | None] | None = None  # returns a problem text or None


class Config(Mapping[str, Any]):
    """Validated options of one actor; read as ``cfg["quote_interval"]`` or ``cfg.quote_interval``."""

    def __init__(self, actor: str, values: dict[str, Any], source: Path | None) -> None:
        self._actor = actor
        self._values = values
        self.source = source

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **changes: Any) -> Config:
        unknown = set(changes) - set(self._values)
        if unknown:
            raise KeyError(f"unknown option(s): {', '.join(sorted(unknown))}")
        return Config(self._actor, {**self._values, **changes}, self.source)


#: where ``keytrio ACTOR`` looks for ``ACTOR.toml`` when --config is not given (upstream: /etc/keylime)
DEFAULT_CONFIG_DIR = Path("/etc/keytrio")
CONFIG_DIR_ENV = "KEYTRIO_CONFIG_DIR"


def default_path(actor: str, env: Mapping[str, str] | None = None) -> Path | None:
    """``$KEYTRIO_CONFIG_DIR/<actor>.toml`` (default /etc/keytrio) if that file exists, else None
    (the defaults and ``KEYTRIO_<ACTOR>_*`` apply)."""
    env = os.environ if env is None else env
    path = Path(env.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR) / f"{actor}.toml"
    return path if path.exists() else None


def env_name(actor: str, key: str) -> str:
    return f"KEYTRIO_{actor.upper()}_{key.upper()}"


def load(
    actor: str,
    options: Sequence[Option],
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < TOML file (top level or an ``[actor]`` table) < environment < ``overrides``."""
    env = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"{path}: no such file"]) from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"{path}: {exc}"]) from None
        table = doc.get(actor, doc)
        if not isinstance(table, dict):
            raise ConfigError([f"{path}: [{actor}] must be a table"])
        raw.update(table)
    known = {o.name: o for o in options}
    for key in raw:
        if key not in known:
            problems.append(f"{_where(path)}: unknown option {key!r}")
    for opt in options:
        text = env.get(env_name(actor, opt.name))
        if text is not None:
            try:
                raw[opt.name] = _from_env(opt, text)
            except ValueError as exc:
                problems.append(f"{env_name(actor, opt.name)}: {exc}")
    if overrides:
        raw.update(overrides)
    values: dict[str, Any] = {}
    for opt in options:
        value = raw.get(opt.name, opt.default)
        try:
            values[opt.name] = _coerce(opt, value)
        except ValueError as exc:
            problems.append(f"{opt.name}: {exc}")
            continue
        if opt.check is not None and values[opt.name] is not None:
            problem = opt.check(values[opt.name])
            if problem:
                problems.append(f"{opt.name}: {problem}")
    if problems:
        raise ConfigError(problems)
    return Config(actor, values, Path(path) if path else None)


def _where(path: Path | None) -> str:
    return str(path) if path else "configuration"


def _from_env(opt: Option, text: str) -> Any:
    if opt.kind == "bool":
        low = text.strip().lower()
        if low not in ("true", "false"):
            raise ValueError("must be true or false")
        return low == "true"
    if opt.kind == "list":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("must be a JSON list, e.g. [\"a\", \"b\"]") from None
        return value
    if opt.kind in ("int", "float", "float_or_auto", "int_or_str"):
        return text.strip()
    return text


def _coerce(opt: Option, value: Any) -> Any:
    if value is None:
        return None
    kind = opt.kind
    if kind == "float_or_auto":  # a number, or "auto" (the actor derives the value; 0 stays a value)
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        kind = "float"
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError("must be true or false")
    if kind in ("int", "float"):
        number = f'a number or "{AUTO}"' if opt.kind == "float_or_auto" else "a number"
        if isinstance(value, bool):
            raise ValueError(f"must be {number}, not {value!r}")
        try:
            num: int | float = int(value) if kind == "int" else float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf) (TOML has inf)
            raise ValueError(f"must be {'an integer' if kind == 'int' else number}, not {value!r}") from None
        # TOML and float() accept nan and inf; nan passes every comparison below, and no option
        # means anything by an infinite value
        if not math.isfinite(num):
            raise ValueError(f"must be a finite number, not {value!r}")
        if kind == "int" and isinstance(value, float) and value != int(value):
            raise ValueError(f"must be an integer, not {value!r}")
        if opt.minimum is not None and num < opt.minimum:
            raise ValueError(f"must be >= {opt.minimum:g}, not {num!r}")
        if opt.maximum is not None and num > opt.maximum:
            raise ValueError(f"must be <= {opt.maximum:g}, not {num!r}")
        return num
    if kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of strings")
        return list(value)
    if kind == "choice":
        if value not in opt.choices:
            raise ValueError(f"must be one of {', '.join(opt.choices)}, not {value!r}")
        return value
    if kind == "path":
        if not isinstance(value, str | Path) or not str(value):
            raise ValueError("must be a path")
        try:
            return Path(value).expanduser()
        except RuntimeError:  # ~name of a user this machine does not have (or no home for ~)
            raise ValueError(f"cannot expand {str(value)!r}: no such user or home directory") from None
    if kind == "int_or_str":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.lower().startswith("0x"):
                try:
                    return int(text, 16)
                except ValueError:
                    raise ValueError(f"bad hex number {value!r}") from None
            if text.isascii() and text.isdigit():
                return int(text)
            return text
        raise ValueError(f"must be a string or integer, not {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {value!r}")
    return value


def default_config_text(actor: str, options: Sequence[Option], title: str = "") -> str:
    """A commented TOML file with every option at its default (``--print-default-config``)."""
    lines = [f"# keytrio {actor} configuration{' — ' + title if title else ''}",
             f"# Every key can be overridden by the environment variable KEYTRIO_{actor.upper()}_<KEY>",
             "# (lists as JSON, booleans as true/false). Without --config, keytrio reads",
             f"# {DEFAULT_CONFIG_DIR}/{actor}.toml if it exists (${CONFIG_DIR_ENV} moves the directory).",
             "", f"[{actor}]"]
    for opt in options:
        lines.append("")
        for h in opt.help.splitlines():
            lines.append(f"# {h}")
        if opt.choices:
            lines.append(f"# one of: {', '.join(opt.choices)}")
        if opt.default is None:
            lines.append(f"# {opt.name} = ")
        else:
            lines.append(f"{opt.name} = {_toml(opt.default)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


@dataclass(frozen=True)
class ActorOptions:
    """One actor's option table with its loader and its commented default file, so that an actor's
    config module says only what is its own: ``load_config = ActorOptions(...).load``."""

    actor: str
    options: tuple[Option, ...]
    title: str  #: the default file's first line names it

    def load(
        self,
        path: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Config:
        """Defaults < TOML file < ``KEYTRIO_<ACTOR>_*`` environment < ``overrides``."""
        return load(self.actor, self.options, path, env=env, overrides=overrides)

    def default_text(self) -> str:
        """The commented default configuration (``keytrio <actor> --print-default-config``)."""
        return default_config_text(self.actor, self.options, self.title)
