"""Every `editlens` command and flag that README.md and docs/ name exists, with the help text saying it: the
docs are read as a user reads them (code blocks and inline code), each command line walked through the CLI's
real command tree (issue 27: docs that documented `serve --max-batch-size` before it was a flag)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from client.cli import app
from client.service_cli import SERVE_EXCLUDED, SERVE_FLAGS
from server.config import Limits, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _command_lines(text: str) -> list[str]:
    """The `editlens ...` command lines of a Markdown text: lines of code blocks that start with the command
    (the indented option lines right under one joined to it) and inline code spans."""
    lines, block, open_cmd = [], False, False
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            block, open_cmd = not block, False
            continue
        if block:
            if stripped.startswith("editlens "):
                lines.append(stripped)
                open_cmd = True
            elif open_cmd and raw[:1].isspace() and stripped[:1] in "[-(":
                lines[-1] += " " + stripped  # an option line of the command above
            else:
                open_cmd = False
            continue
        lines += re.findall(r"`(editlens [^`]+)`", raw)
    return [line.split("#")[0] for line in lines]


def _walk(line: str, root) -> list:
    """The chain of commands a line invokes (the root first); a word after a group that names none of its
    commands ends the walk. Alternatives (`trace|noise-trace`) must all exist; the flags are the first's."""
    chain = [root]
    for word in line.split()[1:]:
        commands = getattr(chain[-1], "commands", None)
        if commands is None:
            break
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", word):
            return [*chain, ...]  # a placeholder (`diagnose NAME`): which command is the reader's choice
        if word.startswith("-") or not re.fullmatch(r"[a-z][a-z0-9|-]*", word):
            continue  # a global option or its value
        found = [commands.get(w) for w in word.split("|")]
        if not all(found):
            chain.append(None)
            break
        chain.append(found[0])
    return chain


def _opts(cmd) -> set[str]:
    out = set()
    for p in cmd.params:
        out.update(getattr(p, "opts", ()))
        out.update(getattr(p, "secondary_opts", ()))
    return out


def test_every_command_and_flag_the_docs_name_exists():
    root = typer.main.get_command(app)
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for line in _command_lines(doc.read_text()):
            chain = _walk(line, root)
            if chain[-1] is ...:
                continue
            if chain[-1] is None:
                missing.append(f"{doc.name}: no such command in {line.strip()!r}")
                continue
            known = set().union(*(_opts(c) for c in chain)) | {"--help"}
            for flag in FLAG.findall(line):
                if flag not in known:
                    missing.append(f"{doc.name}: {' '.join(c.name for c in chain[1:]) or 'editlens'} has no {flag}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_every_server_setting_is_a_serve_flag_unless_excluded_with_a_reason():
    import dataclasses

    root = typer.main.get_command(app)
    serve = root.commands["serve"]
    names = {p.name for p in serve.params}
    fields = {f.name for f in dataclasses.fields(ServerConfig)} | {f.name for f in dataclasses.fields(Limits)}
    assert set(SERVE_EXCLUDED) == {"limits"} and all(SERVE_EXCLUDED.values())
    for name in fields - set(SERVE_EXCLUDED):
        assert name in names, f"ServerConfig/Limits field {name} is not a flag of `editlens serve`"
    assert set(SERVE_FLAGS) <= names


def test_help_texts_render_what_they_say():
    """Rich markup eats square brackets that look like tags (`E[kk^T]` printed as `E`): every docstring and help
    text of the CLI renders with its brackets."""
    root = typer.main.get_command(app)
    from rich.markup import render

    def texts(cmd):
        yield cmd.help or ""
        for p in cmd.params:
            yield getattr(p, "help", "") or ""
        for sub in getattr(cmd, "commands", {}).values():
            yield from texts(sub)

    for text in texts(root):
        rendered = render(text).plain
        assert rendered.count("[") == text.count("[") or "\\[" in text, f"rich drops a [...] of: {text[:120]!r}"
