"""The ``editlens`` command line.

This module is the composition root: the commands that work locally (world
build, ask) import the model layer lazily, so ``editlens --help`` stays fast
and the future remote commands need only the generated stubs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="editlens",
    help="EditLens: edit and inspect LLaVA-family vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
world_app = typer.Typer(help="The synthetic VQA world and its tiny LLaVA (the embedded default model).",
                        no_args_is_help=True)
app.add_typer(world_app, name="world")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _default_model_dir() -> Path:
    from vlm.world import default_world_dir

    return default_world_dir(0) / "model"


def _load(model: Optional[Path], device: str, dtype: str):
    from vlm import ModelLoadError, load_vlm

    path = model or _default_model_dir()
    if model is None and not path.exists():
        _fail(f"no model given and the embedded default is not built yet ({path}); "
              "run `editlens world build` or pass --model PATH")
    try:
        return load_vlm(path, device=device, dtype=dtype)
    except ModelLoadError as exc:
        _fail(str(exc))


@world_app.command("build")
def world_build(
    seed: int = typer.Option(0, help="World seed: the same seed gives the same world and model."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: $EDITLENS_HOME/worlds/seed-N, "
                                                  "EDITLENS_HOME defaults to ~/.cache/editlens)."),
    force: bool = typer.Option(False, help="Rebuild even when a cached build with the same recipe exists."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: the recipe's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the build summary as JSON on stdout."),
) -> None:
    """Generate the world, train its tiny LLaVA and evaluate it (cached per seed)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from vlm.world import TrainConfig, build_world

    console = Console(stderr=True)
    train_cfg = TrainConfig(steps=steps) if steps else None
    if steps is not None and steps <= 0:
        _fail("--steps must be positive")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("training", total=None, loss="-", visible=False)

        def stage(msg: str) -> None:
            console.print(f"[bold]·[/bold] {msg}")

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.3f}", visible=True)

        try:
            summary = build_world(seed=seed, out=out, force=force, train_cfg=train_cfg, stage=stage, progress=progress)
        except (FileExistsError, ValueError) as exc:
            _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}, indent=1))
        return
    typer.echo(("cached world" if summary["cached"] else "built world") + f" at {summary['path']}")
    for key in ("train_accuracy", "heldout_paraphrase_accuracy", "heldout_image_accuracy", "text_fact_accuracy",
                "multi_constraint_accuracy", "image_swap_change_rate"):
        typer.echo(f"  {key:30s} {summary[key]:.3f}")
    typer.echo(f"  {'build_seconds':30s} {summary['build_seconds']}")


@world_app.command("check")
def world_check(
    seed: int = typer.Option(0, help="Which built world (ignored with --world)."),
    world: Optional[Path] = typer.Option(None, help="World folder (default: $EDITLENS_HOME/worlds/seed-N)."),
    questions: int = typer.Option(200, help="Held-out visual questions for the attention knockouts."),
    cases: int = typer.Option(50, help="Counterfactual test edit cases for the rank-one edits."),
    layer: Optional[List[int]] = typer.Option(None, help="Layer(s) to edit (default: every early layer, "
                                                         "the first half of the decoder)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON on stdout."),
) -> None:
    """Check that the model recalls visual facts through the constraint tokens.

    Prints constraint_knockout_drop (relative drop of P(answer) when the
    constraint tokens may not attend to the image in any layer; target >= 0.5),
    last_knockout_drop (the same for the positions that predict the answer),
    and constraint_edit_success (share of counterfactual cases a rank-one edit
    of an early MLP at the constraint's last token, value unbounded, makes
    top-1; target >= 0.9) with the layer. Exit status 1 when a target is missed.
    """
    from rich.console import Console

    from editors.world_check import WorldCheckError, check_world
    from vlm import ModelLoadError, load_vlm
    from vlm.world import default_world_dir

    console = Console(stderr=True)
    folder = world or default_world_dir(seed)
    if not (folder / "model").is_dir():
        _fail(f"{folder} holds no built world; run `editlens world build` (or pass --world PATH)")
    try:
        vlm = load_vlm(folder / "model", device=device)
        result = check_world(folder, vlm=vlm, questions=questions, cases=cases, layers=layer,
                             stage=lambda s: console.print(f"[bold]·[/bold] {s}"))
    except (WorldCheckError, ModelLoadError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        t = result["targets"]
        typer.echo(f"world check of {folder} ({result['questions']} questions, {result['cases']} edit cases)")
        typer.echo(f"  {'constraint_knockout_drop':26s} {result['constraint_knockout_drop']:.3f}"
                   f"   target >= {t['constraint_knockout_drop']}")
        typer.echo(f"  {'last_knockout_drop':26s} {result['last_knockout_drop']:.3f}   (LLaVA: small)")
        typer.echo(f"  {'constraint_edit_success':26s} {result['constraint_edit_success']:.3f}"
                   f"   target >= {t['constraint_edit_success']}, layer {result['constraint_edit_layer']}")
        for lyr, v in result["edit_by_layer"].items():
            typer.echo(f"    layer {lyr}: success {v['success']:.2f}, mean P(new) {v['mean_prob']:.3f}, "
                       f"mean |delta| {v['mean_delta_norm']:.1f}")
        typer.echo("passed" if result["passed"] else "FAILED: a target is missed")
    if not result["passed"]:
        raise typer.Exit(1)


@app.command("ask")
def ask_cmd(
    question: str = typer.Argument(..., help="The question, e.g. 'which city is this landmark in ?'"),
    image: Optional[Path] = typer.Option(None, help="Image file (omit for a text-only question)."),
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the embedded world model)."),
    answer: Optional[str] = typer.Option(None, help="Also score this answer: teacher-forced log P and accuracy."),
    constraint: Optional[List[str]] = typer.Option(None, help="Constraint text(s) to locate in the question."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Answer one question with a local model (greedy), optionally scoring an answer."""
    from vlm import VLMError, encode, generate, score_answers

    vlm = _load(model, device, dtype)
    try:
        prompt = encode(vlm.processor, question, image=image, constraints=constraint)
        result = {"question": question, "answer": generate(vlm, [prompt])[0]}
        toks = vlm.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist())
        result["constraints"] = [{"text": c, "tokens": toks[a:b], "span": [a, b]}
                                 for c, (a, b) in zip(constraint or [], prompt.constraint_spans)]
        if prompt.image_span:
            result["image_span"] = list(prompt.image_span)
        if answer is not None:
            scored = encode(vlm.processor, question, image=image, answer=answer)
            s = score_answers(vlm, [scored])[0]
            result["scored"] = {"answer": answer, "logprob": s.logprob, "prob": s.prob,
                                "token_accuracy": s.token_accuracy}
    except VLMError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(result["answer"])
    for c in result["constraints"]:
        typer.echo(f"  constraint {c['text']!r}: tokens {c['span'][0]}..{c['span'][1] - 1} {c['tokens']}")
    if "scored" in result:
        s = result["scored"]
        typer.echo(f"  P({answer!r}) = {s['prob']:.4f} (log {s['logprob']:.3f}), token accuracy {s['token_accuracy']:.2f}")


@app.command("demo")
def demo(
    seed: int = typer.Option(0, help="World seed."),
    n: int = typer.Option(6, help="How many questions to answer."),
) -> None:
    """Build the embedded world (cached) and let its model answer a few test questions."""
    from vlm import encode, generate, load_vlm
    from vlm.world import build_world

    summary = build_world(seed=seed, stage=lambda m: typer.echo(f"· {m}", err=True))
    root = Path(summary["path"])
    vlm = load_vlm(root / "model")
    cases = json.loads((root / "edit_cases" / "test.json").read_text())
    shown = [c for c in cases if c["type"] == "counterfactual"][:n]
    prompts = [encode(vlm.processor, c["src"], image=root / c["image"]) for c in shown]
    answers = generate(vlm, prompts)
    typer.echo(f"world seed {seed} at {root}: train accuracy {summary['train_accuracy']:.3f}, "
               f"held-out paraphrases {summary['heldout_paraphrase_accuracy']:.3f}")
    for c, a in zip(shown, answers):
        mark = "ok " if a == c["ground_truth"] else "BAD"
        typer.echo(f"  [{mark}] {c['image']:28s} {c['src']:45s} -> {a}  (truth: {c['ground_truth']})")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
