"""``editlens serve`` and the commands that talk to a running server.

``serve`` starts the gRPC server (imported lazily: the other commands need
only the SDK and the generated stubs). ``generate``, ``versions``,
``promote``, ``rollback`` and ``delete`` are remote; ``edit`` and
``diagnose ...`` become remote with ``--server`` (``remote_edit``,
``remote_diagnose`` below). The server address defaults to $EDITLENS_SERVER,
else 127.0.0.1:50051; the token to $EDITLENS_TOKEN.
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from server.config import Limits, ServerConfig

from .cli_support import console, fail, progress_bar
from .options import ADAPTER, DEFAULT_SERVER, JSON, SERVER, TOKEN, config_options

#: ServerConfig fields that are deliberately not `editlens serve` flags, and why
SERVE_EXCLUDED = {"limits": "its fields are flags of their own (LIMIT_FLAGS)"}
#: the flags of `editlens serve`: every field of ServerConfig and of its Limits (default and help there)
SERVE_FLAGS = tuple(f.name for f in dataclasses.fields(ServerConfig) if f.name not in SERVE_EXCLUDED)
LIMIT_FLAGS = tuple(f.name for f in dataclasses.fields(Limits))


#: how the remote commands reach the server, from `editlens --tls-ca ... --token-file ...` (the global options)
TRANSPORT: dict[str, Path | None] = {"tls_ca": None, "tls_cert": None, "tls_key": None, "token_file": None}


@contextmanager
def connect(server: str | None, token: str | None = None):
    """An SDK client; every SDK error becomes ``error: CODE: message`` and exit code 2. TLS and the token
    file come from the global options (``TRANSPORT``)."""
    from server.config import read_token_file
    from vlm.options import ConfigError

    from .sdk import EditLensClient, EditLensError

    if token is None and TRANSPORT["token_file"] is not None:
        try:
            token = read_token_file(TRANSPORT["token_file"])
        except ConfigError as exc:
            fail(str(exc))
    tls = {k: TRANSPORT[k] for k in ("tls_ca", "tls_cert", "tls_key")}
    try:
        client = EditLensClient(server or os.environ.get("EDITLENS_SERVER") or DEFAULT_SERVER, token=token, **tls)
    except ValueError as exc:
        fail(str(exc))
    try:
        yield client
    except EditLensError as exc:
        fail(f"{exc.code.name}: {exc.details}")
    finally:
        client.close()


def _served(s) -> str:
    return (
        "the base model"
        if not s.version
        else f"adapter {s.adapter!r} version {s.version}" + (f" ({s.alias})" if s.alias else "")
    )


def _version_lines(v) -> list[str]:
    lines = [
        f"adapter {v.adapter!r} version {v.version}"
        + (f"  [{', '.join(v.aliases)}]" if v.aliases else "")
        + f"  {v.num_edits} edit(s), editors {'+'.join(v.editors) or '-'}, parent {v.parent or '-'}"
    ]
    for e in v.edits:
        m = e.metrics
        p = f", P {m['p_before']:.3f} -> {m['p_after']:.3f}" if "p_before" in m and "p_after" in m else ""
        lines.append(f"    v{e.version} {e.editor} layer {e.layer}: {e.question!r} ({e.constraint}) -> {e.answer!r}{p}")
        if e.checks:
            names = {"edit": "question", "rephrase": "rephrase", "image_rephrase": "image rephrase"}
            lines.append(
                "      checks: "
                + ", ".join(
                    f"{names.get(c.kind, c.kind)} " + ("answers" if c.answered else f"MISSES ({c.got!r})")
                    for c in e.checks
                )
            )
        if e.layer_evidence is not None:
            ev = e.layer_evidence
            lines.append(
                f"      layer {ev.layer} chosen: {ev.criterion}; scores " + " ".join(f"{x:.3f}" for x in ev.scores)
            )
    return lines


# ------------------------------------------------------------------ serve
@config_options(ServerConfig, SERVE_FLAGS, "settings", defaults={"token": None})
@config_options(Limits, LIMIT_FLAGS, "limits")
def serve_cmd(
    log_level: str = typer.Option("WARNING", help="Python log level of the server's log (stderr)."),
    settings: dict | None = None,
    limits: dict | None = None,
) -> None:
    """Start the EditLens gRPC server: one model, every adapter version per request, edits and diagnostics
    as jobs. Prints 'listening on HOST:PORT', then 'ready: ...' once the model is loaded."""
    import logging
    import sys

    from server.app import serve

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = ServerConfig(**settings, limits=Limits(**limits))
        config.check()
    except ValueError as exc:
        fail(str(exc))

    def say(msg: str) -> None:
        print(msg, flush=True)

    try:
        code = serve(config, say=say)
    except OSError as exc:
        fail(str(exc))
    raise typer.Exit(code)


# --------------------------------------------------------------- generate
def generate_cmd(
    question: str = typer.Argument(..., help="The question, e.g. 'which city is this landmark in ?'"),
    image: Path | None = typer.Option(None, help="Image file (omit for a text-only question)."),
    server: str | None = SERVER,
    adapter: str | None = ADAPTER,
    version: int | None = typer.Option(None, help="Answer with this version (default: the live one)."),
    alias: str | None = typer.Option(None, help="Answer with the version this alias points at."),
    base: bool = typer.Option(False, "--base", help="Answer with the base model, without edits."),
    max_new_tokens: int | None = typer.Option(None, help="Most answer tokens (default: the server's)."),
    stream: bool = typer.Option(False, help="Print the answer as it is generated."),
    as_json: bool = JSON,
) -> None:
    """Answer a question about an image on a running server (greedy), with the adapter's live version."""
    if image is not None and not image.is_file():
        fail(f"image not found: {image}")
    with connect(server) as lens:
        if stream and not as_json:
            for piece in lens.generate_stream(
                image, question, adapter=adapter, version=version, alias=alias, base=base, max_new_tokens=max_new_tokens
            ):
                typer.echo(piece, nl=False)
            typer.echo("")
            return
        g = lens.generate(
            image, question, adapter=adapter, version=version, alias=alias, base=base, max_new_tokens=max_new_tokens
        )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "question": question,
                    "answer": g.text,
                    "served": vars(g.served),
                    "prompt_tokens": g.prompt_tokens,
                    "answer_tokens": g.answer_tokens,
                    "seconds": g.seconds,
                },
                indent=1,
            )
        )
        return
    typer.echo(g.text)
    typer.echo(f"  ({_served(g.served)}, {1000 * g.seconds:.0f} ms)", err=True)


# ------------------------------------------------------------------- edit
def _job_progress(bar):
    """A progress callback for a server job that drives one task of ``bar``."""
    task = bar.add_task("queued", total=None, info="")

    def progress(p) -> None:
        info = f"loss {p.loss:.3f}" if p.loss is not None else (p.message or "")
        bar.update(task, description=p.stage, completed=p.step, total=p.steps or None, info=info)

    return progress


def remote_edit(
    server: str,
    token: str | None,
    adapter: str | None,
    image: Path,
    question: str,
    constraint: str,
    answer: str,
    editor: str,
    layer: Any,
    rephrase: str | None,
    image_rephrase: Path | None,
    promote: bool,
    options: dict[str, Any],
    as_json: bool,
) -> None:
    """``editlens edit --server``: the edit as a server job with a progress bar; prints the new version.
    ``options``: the editor's settings by name (``EditLensClient.edit``)."""
    with connect(server, token) as lens, progress_bar(console()) as bar:
        progress = _job_progress(bar)

        v = lens.edit(
            image,
            question,
            constraint,
            answer,
            adapter=adapter,
            editor=editor,
            layer=layer,
            rephrase=rephrase,
            image_rephrase=image_rephrase,
            promote=promote,
            progress=progress,
            **{k: val for k, val in options.items() if val is not None},
        )
    if as_json:
        typer.echo(json.dumps(v.to_dict(), indent=1))
        return
    e = v.edits[-1] if v.edits else None
    typer.echo(f"registered adapter {v.adapter!r} version {v.version}" + (" (live)" if v.live else " (not live)"))
    if e is None:
        return
    m = e.metrics
    typer.echo(
        f"  P({answer!r}): {m.get('p_before', float('nan')):.4f} -> {m.get('p_after', float('nan')):.4f}"
        f"   layer {e.layer}"
    )
    ev = e.layer_evidence
    if ev is not None:
        typer.echo(f"  layer {ev.layer} chosen: {ev.criterion}; scores " + " ".join(f"{x:.3f}" for x in ev.scores))
    for line in check_lines(e):
        typer.echo(line)
    if promote and not v.live:
        typer.echo(
            "  the edit does not answer its own question, so the version is not live (--keep-unreached); "
            f"look at it with `editlens versions --version {v.version}`, promote it with `editlens promote`"
        )


def check_lines(e) -> list[str]:
    """The edit's own checks, one line each, and a plain sentence for every prompt it does not answer."""
    names = {"edit": "the question", "rephrase": "the rephrase", "image_rephrase": "the image rephrase"}
    lines = []
    for c in e.checks:
        mark = "answers" if c.answered else "MISSES"
        lines.append(
            f"  check {names.get(c.kind, c.kind)}: {mark} {e.answer!r} (P {c.p_answer:.3g})"
            + ("" if c.answered else f"; it answers {c.got!r}")
        )
    missed = [names.get(c.kind, c.kind) for c in e.checks if not c.answered and c.kind != "edit"]
    if missed:
        lines.append(
            f"  warning: the new version does not answer {' or '.join(missed)} with {e.answer!r}; "
            "--strict refuses such an edit"
        )
    return lines


# --------------------------------------------------------------- versions
def versions_cmd(
    server: str | None = SERVER,
    adapter: str | None = ADAPTER,
    version: int | None = typer.Option(None, help="Show this version whole (default: the live one)."),
    as_json: bool = JSON,
) -> None:
    """The adapter's versions, newest first, with their aliases, then one version whole — the live one, or
    --version N —: every edit's manifest record and its layer evidence (--json: the summaries and that
    version with its manifest)."""
    with connect(server) as lens:
        vl = lens.versions(adapter)
        shown = version or vl.live_version
        whole = lens.version(shown, adapter=adapter) if shown else None
    if as_json:
        out = {"adapter": vl.adapter, "live_version": vl.live_version, "aliases": vl.aliases}
        out["versions"] = [v.to_dict() for v in vl.versions]
        out["shown"] = whole.to_dict() if whole is not None else None
        typer.echo(json.dumps(out, indent=1))
        return
    typer.echo(
        f"adapter {vl.adapter!r}: {len(vl.versions)} version(s), live: "
        + (f"version {vl.live_version}" if vl.live_version else "none (the base model answers)")
    )
    for v in vl.versions:
        typer.echo("  " + _version_lines(v)[0])
    if whole is not None:
        typer.echo(f"version {whole.version} whole:")
        for line in _version_lines(whole):
            typer.echo("  " + line)


def promote_cmd(
    version: int = typer.Argument(..., help="The version to point the alias at."),
    alias: str = typer.Option("live", help="The alias (live: served by default)."),
    server: str | None = SERVER,
    token: str | None = TOKEN,
    adapter: str | None = ADAPTER,
    as_json: bool = JSON,
) -> None:
    """Point an alias (default live) at a version."""
    with connect(server, token) as lens:
        v = lens.promote(version, adapter=adapter, alias=alias)
    if as_json:
        typer.echo(json.dumps(v.to_dict(), indent=1))
        return
    typer.echo(f"adapter {v.adapter!r}: {alias} -> version {v.version}")


def rollback_cmd(
    to: int | None = typer.Option(None, "--to", help="Make this version live (default: the one live before)."),
    server: str | None = SERVER,
    token: str | None = TOKEN,
    adapter: str | None = ADAPTER,
    as_json: bool = JSON,
) -> None:
    """Move live back to the version live before (or --to N); the first version rolls back to the base model."""
    with connect(server, token) as lens:
        v = lens.rollback(adapter=adapter, to=to)
        name = adapter or lens.info().default_adapter
    if as_json:
        typer.echo(
            json.dumps(
                {"adapter": name, "live_version": v.version if v else None, "live": v.to_dict() if v else None},
                indent=1,
            )
        )
        return
    typer.echo(f"adapter {name!r}: live -> " + (f"version {v.version}" if v else "none (the base model answers)"))


def delete_cmd(
    version: int = typer.Argument(..., help="The version to delete (not the live one)."),
    server: str | None = SERVER,
    token: str | None = TOKEN,
    adapter: str | None = ADAPTER,
    as_json: bool = JSON,
) -> None:
    """Delete a version and its files from the registry."""
    with connect(server, token) as lens:
        lens.delete(version, adapter=adapter)
    if as_json:
        typer.echo(json.dumps({"adapter": adapter, "deleted": version}))
        return
    typer.echo(f"deleted version {version}")


# -------------------------------------------------------------- diagnose
def remote_diagnose(
    server: str,
    name: str,
    image: Path | None,
    question: str | None,
    constraint: str | None,
    answer: str | None,
    out: Path | None,
    as_json: bool,
    adapter: str | None = None,
    version: int | None = None,
    base: bool = False,
    rephrase: str | None = None,
    image_rephrase: Path | None = None,
    **options: Any,
) -> None:
    """``editlens diagnose NAME --server``: one case on the server; the same summary/JSON and --out figures."""
    missing = [n for n, v in (("--image", image), ("--question", question), ("--constraint", constraint)) if v is None]
    if missing:
        fail(f"a remote diagnostic takes one case: give {', '.join(missing)}")
    for img in (image, image_rephrase):
        if img is not None and not img.is_file():
            fail(f"image not found: {img}")
    with connect(server) as lens, progress_bar(console()) as bar:
        task = bar.add_task(name, total=None, info="")

        def progress(p) -> None:
            bar.update(task, description=p.stage, completed=p.step, total=p.steps or None, info=p.message)

        d = lens.diagnose(
            name,
            image,
            question,
            constraint,
            answer=answer,
            png=out is not None,
            adapter=adapter,
            version=version,
            base=base,
            rephrase=rephrase,
            image_rephrase=image_rephrase,
            progress=progress,
            **{k: v for k, v in options.items() if v is not None and v != []},
        )
    data = dict(d.data)
    data["served"] = vars(d.served)
    if d.recommended_layer is not None:
        data["recommended_layer"] = d.recommended_layer
    if out is not None and d.figures:
        written = []
        for fname, png in d.figures.items():
            suffix = Path(fname).stem[len(name) :] if Path(fname).stem.startswith(name) else "-" + Path(fname).stem
            path = out if not suffix else out.with_name(out.stem + suffix + ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
            written.append(str(path))
        data["png"] = written[0] if len(written) == 1 else written
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    for line in d.lines:
        typer.echo(line)
    typer.echo(f"  (on the server: {_served(d.served)}, {d.seconds:.2f} s)")
    if out is not None:
        typer.echo(f"wrote {out}")


# ------------------------------------------------------------------- jobs
jobs_app = typer.Typer(help="A running server's jobs (edits, training, diagnostics): list them, cancel one.")


@jobs_app.command("list")
def jobs_list_cmd(server: str | None = SERVER, token: str | None = TOKEN, as_json: bool = JSON) -> None:
    """The server's queued and running jobs, oldest first (needs the token)."""
    from dataclasses import asdict

    with connect(server, token) as lens:
        jobs = lens.jobs()
    if as_json:
        typer.echo(json.dumps([asdict(j) for j in jobs], indent=1))
        return
    if not jobs:
        typer.echo("no job is queued or running")
    for j in jobs:
        step = f" {j.step}/{j.steps}" if j.steps else ""
        typer.echo(
            f"job {j.id}: {j.kind}"
            + (f" of adapter {j.adapter!r}" if j.adapter else "")
            + f", {j.state}{' (cancelling)' if j.cancelling else ''}, {j.stage}{step}, {j.seconds:.0f} s, from {j.peer}"
        )


@jobs_app.command("cancel")
def jobs_cancel_cmd(
    job: int = typer.Argument(..., help="The job's id (editlens jobs list)."),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Cancel a queued or running job: it registers nothing and its client gets CANCELLED (a job already
    registering its version finishes)."""
    with connect(server, token) as lens:
        j = lens.cancel_job(job)
    typer.echo(f"job {j.id} ({j.kind}) cancelled; it stops at its next progress report")


def register(app: typer.Typer) -> None:
    """Add the service commands to the ``editlens`` app."""
    app.add_typer(jobs_app, name="jobs")
    app.command("serve")(serve_cmd)
    app.command("generate")(generate_cmd)
    app.command("versions")(versions_cmd)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("delete")(delete_cmd)


def remote_train(
    server: str,
    token: str | None,
    adapter: str | None,
    options: dict[str, Any],
    promote: bool,
    as_json: bool,
) -> None:
    """``editlens visedit train --server``: train a VisEdit editor as a server job; prints its version.
    ``options``: the trainer's settings by name (layer and steps, and the fields of ``VisEditTrainOptions``)."""
    options = dict(options)
    layer, steps = options.pop("layer", "auto"), options.pop("steps", 0)
    with connect(server, token) as lens, progress_bar(console()) as bar:
        progress = _job_progress(bar)

        v = lens.train_visedit(
            adapter=adapter or "visedit",
            layer=None if layer == "auto" else int(layer),
            steps=steps,
            promote=promote,
            progress=progress,
            **options,
        )
    if as_json:
        typer.echo(json.dumps(v.to_dict(), indent=1))
        return
    t = v.manifest.get("training", {})
    typer.echo(
        f"registered the trained VisEdit editor as adapter {v.adapter!r} version {v.version}"
        + (" (live)" if v.live else " (not live)")
    )
    if t:
        typer.echo(
            f"  {t.get('steps')} steps, best validation loss {t.get('best_validation_loss')} at step "
            f"{t.get('best_step')}, VEAD at layer {t.get('adapter', {}).get('layer')}"
        )
