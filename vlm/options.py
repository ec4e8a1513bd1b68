"""Configuration fields that carry their own default and help text.

Every configuration dataclass of EditLens (an editor's config, the VisEdit
trainer's, the server's) declares its fields with ``option(default, help)``.
That field is the one source of the option: the CLI builds its ``--flags``
from it (``client.options``), the server fills the config from the request's
typed options message by field name (``server.convert.config_from_message``).
A default changed here changes everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any

_MISSING: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says which and why."""


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    flag: str | None = None,
    envvar: str | None = None,
) -> Any:
    """A dataclass field with its help text (and, optionally, the CLI flag it is spelled as and the environment
    variable the CLI reads it from)."""
    meta = {"help": help}
    if flag is not None:
        meta["flag"] = flag
    if envvar is not None:
        meta["envvar"] = envvar
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``cls`` (``dataclasses.MISSING`` when it has none)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def build_config(cls: type, options: dict[str, Any]) -> Any:
    """``cls(**options)``, with an unknown option name as a ``ConfigError`` that lists the known ones."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; known: {', '.join(sorted(known))}")
    bad = sorted(k for k, v in options.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:  # inf / nan would run a job to a meaningless end (lr=inf: every step NaN)
        raise ConfigError(f"option(s) {bad} of {cls.__name__} must be finite numbers")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _integral(v, hints.get(k)) for k, v in options.items()})


def _integral(value: Any, annotation: Any) -> Any:
    """A whole float as an int where the field wants an int (JSON numbers arrive as floats)."""
    kinds = typing.get_args(annotation) or (annotation,)
    if int in kinds and float not in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    return value
