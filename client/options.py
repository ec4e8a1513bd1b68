"""Command-line options, each defined once.

* The blocks many commands share (``DEVICE``, ``DTYPE``, ``JSON``, ``WORLD``,
  ``SEED``, ``MODEL``, ``SERVER``, ``TOKEN``, ``ADAPTER``).
* ``config_options(Config, names, dest)``: a command's options derived from a
  configuration dataclass whose fields are ``vlm.options.option(default,
  help)`` — the same default and help the server and the library use. The
  command receives them as one dict ``dest`` (field name -> value).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer

from vlm.options import option_default

DEFAULT_SERVER = "127.0.0.1:50051"

DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
DTYPE = typer.Option("auto", help="auto, float32, bfloat16 or float16.")
JSON = typer.Option(False, "--json", help="Print JSON on stdout.")
WORLD = typer.Option(None, help="World folder (default: $EDITLENS_HOME/worlds/seed-N).")
SEED = typer.Option(0, help="Which built world (ignored with --world).")
MODEL = typer.Option(None, help="Model folder (default: the embedded world model).")
SERVER = typer.Option(
    None,
    "--server",
    envvar="EDITLENS_SERVER",
    help=f"The server's host:port (default: $EDITLENS_SERVER, else {DEFAULT_SERVER}).",
)
TOKEN = typer.Option(
    None,
    "--token",
    envvar="EDITLENS_TOKEN",
    help="Bearer token for calls that change the registry (default: $EDITLENS_TOKEN).",
)
ADAPTER = typer.Option(None, "--adapter", help="The adapter (default: the server's default adapter).")


def _cli_type(annotation: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The type typer parses a field as, and how the parsed value becomes the field's value."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in args if a is not type(None)]
        optional = len(kinds) < len(args)
        if set(kinds) == {int, str}:  # a layer number or a word ("auto")
            return (str | None if optional else str), _int_or_word
        if len(kinds) == 1:
            return kinds[0] | None, lambda v: v
    return annotation, lambda v: v


def _int_or_word(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def config_options(
    cls: type,
    names: Sequence[str],
    dest: str,
    *,
    only_given: bool = False,
    defaults: dict[str, Any] | None = None,
):
    """Give a command one ``--flag`` per field ``names`` of the dataclass ``cls`` (the field's default and help;
    a field's ``flag`` metadata renames it, ``envvar`` metadata reads it from the environment, a bool becomes
    ``--x/--no-x``); the command gets them as the dict ``dest``.

    ``only_given``: the dict holds only the flags the user gave (the help still names the default), so the
    options can go to another editor's config or to a server that applies its own defaults.
    ``defaults`` overrides the dataclass default for this command.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}

    def decorate(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != dest]
        clash = {p.name for p in own} & set(names)
        if clash:
            raise TypeError(f"{fn.__name__}: option(s) {sorted(clash)} are defined twice")
        added, parsers = [], {}
        for name in names:
            f = fields[name]
            flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
            typ, parsers[name] = _cli_type(hints[name])
            decls = (f"{flag}/--no-{flag[2:]}",) if typ is bool else (flag,)
            default = defaults.get(name, option_default(cls, name))
            help_text = f.metadata.get("help", "")
            if only_given:
                if default is not None and default is not dataclasses.MISSING:
                    help_text += f" (default {default})"
                default, typ = None, typ | None
            info = typer.Option(
                default, *decls, help=help_text, envvar=f.metadata.get("envvar"), show_default=not only_given
            )
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=typ))

        @functools.wraps(fn)
        def command(**kwargs):
            values = {n: kwargs.pop(n) for n in names}
            kwargs[dest] = {n: parsers[n](v) for n, v in values.items() if not (only_given and v is None)}
            return fn(**kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {
            **{k: v for k, v in fn.__annotations__.items() if k != dest},
            **{p.name: p.annotation for p in added},
        }
        return command

    return decorate


def parse_settings(cls: type, settings: Sequence[str] | None) -> dict[str, Any]:
    """``--set name=value`` options as config values of ``cls`` (converted to the field's type); the CLI's
    error for a malformed one or a name ``cls`` does not have."""
    from .cli_support import fail

    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for item in settings or ():
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            fail(f"--set takes name=value, not {item!r}")
        if name not in fields:
            fail(f"{cls.__name__} has no setting {name!r}; it has {', '.join(sorted(fields))}")
        out[name] = _convert(text.strip(), hints[name], name)
    return out


def _convert(text: str, annotation: Any, name: str) -> Any:
    from .cli_support import fail

    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if text.lower() in ("none", "null") and type(None) in typing.get_args(annotation):
        return None
    for kind in kinds:
        try:
            if kind is bool:
                if text.lower() in ("true", "yes", "1", "false", "no", "0"):
                    return text.lower() in ("true", "yes", "1")
                continue
            if kind in (int, float, str, Path):
                return kind(text)
        except ValueError:
            continue
    fail(f"--set {name}={text!r}: expected {annotation}")
