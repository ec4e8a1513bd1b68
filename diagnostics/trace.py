"""Causal traces: where does the model recall the answer to a visual question?

Two corruptions of the clean run (image, question) → P_clean(O):

* token replacement (MultiModalCausalTrace, Basu et al. §3.2): the visual
  constraint's token ids ("this landmark") are replaced by another phrase of
  the same token length that makes the image irrelevant (a named entity),
  so the prompt keeps its length and every position keeps its meaning;
* Gaussian noise (ROME, Meng et al.; Basu App. C as the baseline): noise of
  ``noise_scale`` × σ (σ: the standard deviation of the clean embeddings at
  the noised positions) is added to the embeddings of the visual tokens and
  of the constraint's tokens, ``samples`` draws from a fixed seed.

Then, for every row (a text token, all image tokens as one group, or one
block of image tokens), every state kind (``hidden`` residual stream,
``mlp`` output, ``attn`` output) and every layer ℓ, the clean states of that
kind at the row's positions in the window of layers around ℓ are restored
into the corrupted run. The indirect effect is P_restored(O) − P_corrupt(O)
(for noise: both averaged over the samples).

Restoring a position before the first corrupted token is the identity (under
causal attention nothing there changed), so such rows get an indirect effect
of exactly 0 without being run; the batched engine also computes the prefix
up to the first corrupted token once and reuses its key/value cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from vlm.images import TOKEN_TYPE_KEYS
from vlm.loading import VLM
from vlm.patching import Patch, PrefixCache, run_patched, run_suffix
from vlm.positions import position_ids
from vlm.prompts import collate, encode

from .cases import DiagnosticCase, Prepared, prepare
from .engine import Cell, CellRunner, Progress
from .errors import DiagnosticError, ReplacementError

TRACE_KINDS = ("hidden", "mlp", "attn")
#: an indirect effect below this (a change of P(answer) of less than one percentage point) localises nothing: a
#: trace whose every effect is smaller names no layer (an insertion of an entity the model never saw: nothing
#: in the model carries the answer, its largest effect is ~1e-5 and a colour bar would still show a "peak")
NEGLIGIBLE_EFFECT = 0.01
# used when neither a replacement nor candidates are given: named entities a real LLaVA knows
GENERIC_REPLACEMENTS = (
    "paris",
    "london",
    "the eiffel tower",
    "the taj mahal",
    "barack obama",
    "albert einstein",
    "new york city",
    "the statue of liberty",
    "mount everest",
)

# roles used to align rows of different prompts when averaging over cases
ROLES = (
    "prompt start",
    "image (all)",
    "image block",
    "image marker",
    "question before constraint",
    "constraint first",
    "constraint middle",
    "constraint last",
    "first after constraint",
    "further tokens",
    "last token",
)


@dataclass
class TraceRow:
    label: str
    positions: list[int]
    role: str
    constraint: bool = False


@dataclass
class TraceResult:
    method: str  # "token-replacement" | "gaussian-noise"
    kinds: list[str]
    window: int
    rows: list[TraceRow]
    effects: dict[str, list[list[float]]]  # kind → rows × layers, P_restored − P_corrupt
    p_clean: float
    p_corrupt: float
    answer: str  # O's first token
    question: str
    corrupted_question: str | None = None  # token replacement: the question as corrupted
    replacement: str | None = None
    noise: dict | None = None  # gaussian noise: std, scale, samples, seed
    label: str = ""
    cases: int = 1
    cells: int = 0
    forward_passes: int = 0
    seconds: float = 0.0

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.effects.values()))[0])

    @property
    def largest_effect(self) -> float:
        """The largest indirect effect (in absolute value) over every kind, row and layer."""
        return max((abs(v) for rows in self.effects.values() for row in rows for v in row), default=0.0)

    @property
    def localises(self) -> bool:
        """Whether any effect is large enough to say where the answer is computed (``NEGLIGIBLE_EFFECT``)."""
        return self.largest_effect >= NEGLIGIBLE_EFFECT

    def effect(self, kind: str, role_or_label: str) -> list[float]:
        for i, r in enumerate(self.rows):
            if r.label == role_or_label or r.role == role_or_label:
                return self.effects[kind][i]
        raise KeyError(role_or_label)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------- helpers
def window_layers(layer: int, window: int, num_layers: int) -> list[int]:
    """The window of ``window`` layers around ``layer`` (ROME's convention), clipped to the model."""
    lo = max(0, layer - window // 2)
    hi = min(num_layers, layer - window // 2 + window)
    return list(range(lo, hi))


def check_window(window: int, num_layers: int) -> None:
    """Raise ``DiagnosticError`` unless ``window`` is 1..num_layers."""
    if not isinstance(window, int) or window < 1:
        raise DiagnosticError(f"the window must be a positive number of layers, not {window!r}")
    if window > num_layers:
        raise DiagnosticError(f"the window of {window} layers is larger than the model's {num_layers} layers")


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """The state kinds to trace, checked (hidden, mlp, attn)."""
    kinds = list(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in TRACE_KINDS]
    if bad or not kinds:
        raise DiagnosticError(f"unknown state kind(s) {bad or kinds}; choose from {list(TRACE_KINDS)}")
    return kinds


def trace_rows(prep: Prepared, image_block: int | None = None) -> list[TraceRow]:
    """Rows in prompt order: text tokens one by one (an image's crop markers too); image tokens as one group
    and per block (blocks of image tokens counted in order, across the runs of a split image)."""
    p = prep.prompt
    image = p.image_positions  # in runs where the image was split into crops
    i0, on_image = image[0], set(image)
    if image_block is None:  # one row of the patch grid
        image_block = max(1, int(round(len(image) ** 0.5)))
    if image_block < 1:
        raise DiagnosticError("an image block must hold at least one token")
    c0, c1 = p.constraint_spans[0]
    rows: list[TraceRow] = []
    for pos in range(p.last_prompt_pos + 1):
        if pos == i0:
            rows.append(TraceRow("image (all)", image, "image (all)"))
            for s in range(0, len(image), image_block):
                blk = image[s : s + image_block]
                rows.append(TraceRow(f"image {s}-{s + len(blk) - 1}", blk, "image block"))
        if pos in on_image:
            continue
        if pos < i0:
            role = "prompt start"
        elif pos < p.image_span[1]:
            role = "image marker"  # between the runs of a split image (Idefics3's crop markers)
        elif pos < c0:
            role = "question before constraint"
        elif pos < c1:
            role = "constraint last" if pos == c1 - 1 else "constraint first" if pos == c0 else "constraint middle"
        elif pos == p.last_prompt_pos:
            role = "last token"
        elif pos == c1:
            role = "first after constraint"
        else:
            role = "further tokens"
        rows.append(TraceRow(prep.tokens[pos], [pos], role, c0 <= pos < c1))
    return rows


def _clean_states(
    vlm: VLM, prep: Prepared, kinds: Sequence[str], embeds: bool = False
) -> dict[tuple[str, int], torch.Tensor]:
    """Every state of ``kinds`` at every layer of the clean run, by (kind, layer); with ``embeds`` also its
    language-model input embeddings (key ``("embeds", -1)``)."""
    caps = [(k, l) for k in kinds for l in range(vlm.num_layers)] + ([("embeds", -1)] if embeds else [])
    run = run_patched(vlm, collate([prep.prompt], vlm.tokenizer.pad_token_id), capture=caps)
    return {key: t[0] for key, t in run.captured.items()}


def _restore_patch(clean, kind: str, layers: list[int], positions: list[int]) -> Patch:
    vals = torch.stack([clean[(kind, l)][positions] for l in layers])
    return Patch(row=0, kind=kind, positions=positions, values=vals, layers=layers)


# ------------------------------------------------------- token replacement
def replace_constraint(
    vlm: VLM,
    prep: Prepared,
    replacement: str | None = None,
    candidates: Sequence[str] = (),
    max_candidates: int = 32,
    mode: str = "batched",
    clean_embeds: torch.Tensor | None = None,
) -> tuple[str, str, object]:
    """(replacement, corrupted question, corrupted prompt) with the same token length and layout.

    A given ``replacement`` must fit exactly. Otherwise, of ``candidates``
    (the case's own, e.g. the world's entity names, then
    ``GENERIC_REPLACEMENTS``) the first ``max_candidates`` that fit are
    scored in one batch and the one with the lowest P(O) is taken: the
    corruption should remove the answer (P_corrupt ≪ P_clean), and a named
    entity the model does not tie to O does that best. In the ``batched``
    mode the candidates share the clean prompt's cached prefix (everything
    before the constraint, the image included); ``naive`` and ``uncached``
    run each candidate whole. ``clean_embeds``: the clean prompt's (T, d) language-model input embeddings
    when already computed (the batched mode then runs no vision tower here).
    """
    case, p = prep.case, prep.prompt
    c0, c1 = p.constraint_spans[0]
    q = case.question
    at = q.lower().find(case.constraint.lower())
    tried: list[str] = []

    def attempt(phrase: str):
        phrase = phrase.strip()
        if not phrase or phrase.lower() == case.constraint.lower():
            return None
        new_q = q[:at] + phrase + q[at + len(case.constraint) :]
        cp = encode(vlm.processor, new_q, pixel_values=p.image, constraints=[phrase])
        n = cp.constraint_spans[0][1] - cp.constraint_spans[0][0]
        tried.append(f"{phrase!r} ({n} tokens)")
        same = (
            cp.length == p.length
            and cp.constraint_spans[0] == (c0, c1)
            and torch.equal(cp.input_ids[:c0], p.input_ids[:c0])
            and torch.equal(cp.input_ids[c1:], p.input_ids[c1:])
            and not torch.equal(cp.input_ids[c0:c1], p.input_ids[c0:c1])
        )
        return (phrase, new_q, cp) if same else None

    if replacement is not None:
        if not replacement.strip():
            raise ReplacementError("the replacement phrase is empty")
        got = attempt(replacement)
        if got is None:
            raise ReplacementError(
                f"the replacement {replacement!r} cannot stand in for the constraint {case.constraint!r} "
                f"({c1 - c0} tokens) without changing the prompt's length or other tokens: "
                f"tried {tried[-1:] or [replacement]}"
            )
        return got
    fitting = []
    for phrase in dict.fromkeys(list(candidates) + list(GENERIC_REPLACEMENTS)):
        got = attempt(phrase)
        if got is not None:
            fitting.append(got)
        if len(fitting) >= max_candidates:
            break
    if not fitting:
        raise ReplacementError(
            f"no replacement phrase encodes to the {c1 - c0} tokens of the constraint {case.constraint!r}; "
            f"tried {', '.join(tried[:8])}{' ...' if len(tried) > 8 else ''}. Give one with --replace."
        )
    # of the phrases that fit, the one that removes the answer most: lowest P_corrupt(O)
    logits = _candidate_logits(vlm, p, [f[2] for f in fitting], mode, clean_embeds)
    probs = torch.softmax(logits, dim=-1)
    return fitting[int(probs[:, prep.target_id].argmin())]


def _swapped_embeds(vlm: VLM, clean_embeds: torch.Tensor, corrupted, start: int) -> torch.Tensor:
    """(1, T, d) input embeddings of a corrupted prompt from the clean one's (T, d): its own token embeddings
    from ``start`` on (it equals the clean prompt before, the image included)."""
    with torch.no_grad():
        tail = vlm.model.get_input_embeddings()(corrupted.input_ids[start:].to(vlm.input_device))
    return torch.cat([clean_embeds[:start], tail.to(clean_embeds.dtype)])[None]


def _candidate_logits(
    vlm: VLM, clean, corrupted: Sequence, mode: str, clean_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits at the last prompt position of each corrupted prompt (equal to the clean one outside the
    constraint). ``batched``: over the clean prompt's cached prefix up to the constraint, from the clean
    embeddings with the suffix's token embeddings swapped in (the vision tower runs once)."""
    n, last = len(corrupted), [clean.last_prompt_pos] * len(corrupted)
    c0 = clean.constraint_spans[0][0]
    after_image = clean.image_span is None or clean.image_span[1] <= c0
    if mode != "batched" or not after_image or c0 < 1:
        run = run_patched(vlm, collate(list(corrupted), vlm.tokenizer.pad_token_id))
        return run.logits_at(list(range(n)), last)
    inputs = collate([clean], vlm.tokenizer.pad_token_id)
    if clean_embeds is None:
        embeds = run_patched(vlm, inputs, capture=[("embeds", -1)], stop_after_layer=0).captured[("embeds", -1)]
    else:
        embeds = clean_embeds[None]
    table = vlm.model.get_input_embeddings()
    with torch.no_grad():
        tail = table(torch.stack([cp.input_ids[c0:] for cp in corrupted]).to(vlm.input_device))
    rows = torch.cat([embeds[:, :c0].expand(n, -1, -1), tail.to(embeds.dtype)], dim=1)
    pos = position_ids(vlm, inputs)  # the corrupted prompts' too: the same image and length
    marks = {k: v for k, v in inputs.items() if k in TOKEN_TYPE_KEYS}
    run = run_suffix(vlm, rows, PrefixCache.build(vlm, embeds, c0, pos, marks), positions=pos)
    return run.logits_at(list(range(n)), last)


def _trace(
    vlm: VLM,
    prep: Prepared,
    runner: CellRunner,
    clean,
    kinds,
    window,
    rows,
    first_corrupt: int,
    base_patches: Sequence[Sequence[Patch]],
    progress: Progress | None,
    corrupt=None,
):
    """Cells for every (row, kind, layer) × base patch set (noise samples); effects averaged over sets.

    With ``corrupt`` states (isolated trace) the same kind at every other layer is held at its
    corrupted value at the row's positions."""
    L = vlm.num_layers
    live = [i for i, r in enumerate(rows) if max(r.positions) >= first_corrupt]
    cells: list[Cell] = [Cell(patches=list(bp)) for bp in base_patches]
    index = []
    for i in live:
        for kind in kinds:
            for layer in range(L):
                lays = window_layers(layer, window, L)
                restore = [_restore_patch(clean, kind, lays, rows[i].positions)]
                if corrupt is not None and kind != "hidden":
                    others = [l for l in range(L) if l not in lays]
                    if others:
                        restore.append(_restore_patch(corrupt, kind, others, rows[i].positions))
                for bp in base_patches:
                    cells.append(Cell(patches=list(bp) + restore))
                index.append((i, kind, layer))
    res = runner.run(cells, progress)
    S = len(base_patches)
    probs = res.probs
    p_corrupt = float(probs[:S].mean())
    restored = probs[S:].reshape(-1, S).mean(dim=1)
    effects = {k: [[0.0] * L for _ in rows] for k in kinds}
    for (i, kind, layer), pr in zip(index, restored.tolist()):
        effects[kind][i][layer] = pr - p_corrupt
    return effects, p_corrupt, len(cells), res.forward_passes


def _select(rows: list[TraceRow], roles: Sequence[str] | None) -> list[TraceRow]:
    if roles is None:
        return rows
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise DiagnosticError(f"unknown row role(s) {bad}; choose from {list(ROLES)}")
    return [r for r in rows if r.role in roles]


def causal_trace(
    vlm: VLM,
    case: DiagnosticCase | Prepared,
    kinds: Sequence[str] = TRACE_KINDS,
    window: int = 1,
    replacement: str | None = None,
    candidates: Sequence[str] = (),
    image_block: int | None = None,
    roles: Sequence[str] | None = None,
    isolate: bool = False,
    clean_context=None,
    mode: str = "batched",
    batch_size: int = 64,
    progress: Progress | None = None,
) -> TraceResult:
    """MultiModalCausalTrace of one case (token replacement of the visual constraint).

    ``roles`` restricts the rows (e.g. ["constraint last"]); default: all.

    ``clean_context``: a factory of a context manager under which the clean
    run (P_clean and the states to restore) is computed, while the corrupted
    runs are made without it; e.g. ``lambda: attach(vlm, edit_set)`` traces
    *an edit*: which layer's state, taken from the edited model, carries the
    new answer into the unedited model.

    ``isolate``: the MLP / attention output of the window is restored while the
    same module at every other layer keeps its corrupted output at those
    positions (ROME's "severed" comparison, per module). The plain trace
    credits a module with everything downstream of it: on the world's model
    restoring layer 0's MLP at the constraint restores the subject, so every
    later MLP's fact (an edit at layer 3 included) follows and the plain
    MLP effect peaks at layer 0 whatever layer holds the fact. The isolated
    effect credits only the module's own output.
    """
    t0 = time.perf_counter()
    check_window(window, vlm.num_layers)
    kinds = check_kinds(kinds)
    # the batched mode takes the clean states' input embeddings for the candidates and, with the constraint's
    # tokens swapped, for the corrupted run: no more vision-tower runs (not under clean_context: an edit could
    # act there)
    share = mode == "batched" and clean_context is None
    with clean_context() if clean_context is not None else contextlib.nullcontext():
        prep = case if isinstance(case, Prepared) else prepare(vlm, case)
        clean = _clean_states(vlm, prep, kinds, embeds=share)
        embeds = clean.pop(("embeds", -1), None)
        phrase, new_q, corrupt = replace_constraint(
            vlm, prep, replacement, list(candidates) + list(prep.case.replacements), mode=mode, clean_embeds=embeds
        )
    held = _clean_states(vlm, replace(prep, prompt=corrupt), kinds) if isolate else None
    rows = _select(trace_rows(prep, image_block), roles)
    c0 = prep.prompt.constraint_spans[0][0]
    runner = CellRunner(
        vlm,
        corrupt,
        prep.target_id,
        mode=mode,
        batch_size=batch_size,
        embeds=_swapped_embeds(vlm, embeds, corrupt, c0) if embeds is not None else None,
    )
    first = prep.prompt.constraint_spans[0][0]
    effects, p_corrupt, cells, passes = _trace(
        vlm, prep, runner, clean, kinds, window, rows, first, [[]], progress, corrupt=held
    )
    return TraceResult(
        method="token-replacement, isolated" if isolate else "token-replacement",
        kinds=kinds,
        window=window,
        rows=rows,
        effects=effects,
        p_clean=prep.p_clean,
        p_corrupt=p_corrupt,
        answer=prep.target_token,
        question=prep.case.question,
        corrupted_question=new_q,
        replacement=phrase,
        label=prep.case.label,
        cells=cells,
        forward_passes=passes,
        seconds=time.perf_counter() - t0,
    )


def edit_trace(
    vlm: VLM,
    case: DiagnosticCase,
    edit_context,
    kinds: Sequence[str] = TRACE_KINDS,
    window: int = 1,
    replacement: str | None = None,
    candidates: Sequence[str] = (),
    image_block: int | None = None,
    roles: Sequence[str] | None = None,
    mode: str = "batched",
    batch_size: int = 64,
    progress: Progress | None = None,
) -> TraceResult:
    """Where does an edit act? The token-replacement trace with the clean states of the edited model
    (``edit_context``, e.g. ``lambda: attach(vlm, edit_set)``) restored into the unedited model's
    corrupted run, minus the same trace with the unedited model's clean states.

    A state the edit does not change (every layer before the edited one) gets exactly 0, and
    what the unedited model already knew about the answer cancels; what remains is the edit's
    own indirect effect. P_clean is the edited model's, P_corrupt the unedited model's.
    """
    t0 = time.perf_counter()
    edited = causal_trace(
        vlm,
        case,
        kinds=kinds,
        window=window,
        replacement=replacement,
        candidates=candidates,
        image_block=image_block,
        roles=roles,
        clean_context=edit_context,
        mode=mode,
        batch_size=batch_size,
        progress=progress,
    )
    base = causal_trace(
        vlm,
        case,
        kinds=kinds,
        window=window,
        replacement=edited.replacement,
        image_block=image_block,
        roles=roles,
        mode=mode,
        batch_size=batch_size,
        progress=progress,
    )
    effects = {
        k: [[a - b for a, b in zip(ra, rb)] for ra, rb in zip(edited.effects[k], base.effects[k])] for k in edited.kinds
    }
    return replace(
        edited,
        method="edit (edited - unedited)",
        effects=effects,
        cells=edited.cells + base.cells,
        forward_passes=edited.forward_passes + base.forward_passes,
        seconds=time.perf_counter() - t0,
    )


def noise_trace(
    vlm: VLM,
    case: DiagnosticCase | Prepared,
    kinds: Sequence[str] = TRACE_KINDS,
    window: int = 1,
    samples: int = 5,
    noise_scale: float = 3.0,
    seed: int = 0,
    image_block: int | None = None,
    roles: Sequence[str] | None = None,
    mode: str = "batched",
    batch_size: int = 64,
    progress: Progress | None = None,
) -> TraceResult:
    """ROME's Gaussian-noise trace: noise on the visual tokens' and the constraint's embeddings."""
    t0 = time.perf_counter()
    check_window(window, vlm.num_layers)
    kinds = check_kinds(kinds)
    if samples < 1:
        raise DiagnosticError("the noise trace needs at least one sample")
    if noise_scale <= 0:
        raise DiagnosticError("the noise scale must be positive")
    prep = case if isinstance(case, Prepared) else prepare(vlm, case)
    p = prep.prompt
    noised = p.image_positions + list(range(*p.constraint_spans[0]))
    clean = _clean_states(vlm, prep, kinds)
    runner = CellRunner(vlm, p, prep.target_id, mode=mode, batch_size=batch_size)
    emb = runner.embeds[0, noised].float()
    std = float(emb.std()) * noise_scale
    g = torch.Generator().manual_seed(seed)
    base = [
        [
            Patch(
                row=0,
                kind="embeds",
                positions=noised,
                mode="add",
                values=(torch.randn(len(noised), emb.shape[1], generator=g) * std).to(emb.dtype),
            )
        ]
        for _ in range(samples)
    ]
    rows = _select(trace_rows(prep, image_block), roles)
    effects, p_corrupt, cells, passes = _trace(
        vlm, prep, runner, clean, kinds, window, rows, min(noised), base, progress
    )
    return TraceResult(
        method="gaussian-noise",
        kinds=kinds,
        window=window,
        rows=rows,
        effects=effects,
        p_clean=prep.p_clean,
        p_corrupt=p_corrupt,
        answer=prep.target_token,
        question=p.question,
        noise={"std": std, "scale": noise_scale, "samples": samples, "seed": seed},
        label=prep.case.label,
        cells=cells,
        forward_passes=passes,
        seconds=time.perf_counter() - t0,
    )


def average_traces(results: Sequence[TraceResult]) -> TraceResult:
    """Mean over cases with rows aligned by role (image, constraint first/last, last token ...)."""
    if not results:
        raise DiagnosticError("nothing to average")
    kinds, L = results[0].kinds, results[0].num_layers
    sums: dict[str, dict[str, torch.Tensor]] = {k: {} for k in kinds}
    counts: dict[str, int] = {}
    for r in results:
        if r.kinds != kinds or r.num_layers != L:
            raise DiagnosticError("traces to average must share kinds and layers")
        for role in ROLES:
            idx = [i for i, row in enumerate(r.rows) if row.role == role]
            if not idx:
                continue
            counts[role] = counts.get(role, 0) + 1
            for k in kinds:
                v = torch.tensor([r.effects[k][i] for i in idx]).mean(dim=0)
                sums[k][role] = sums[k].get(role, torch.zeros(L)) + v
    roles = [role for role in ROLES if role in counts]
    rows = [TraceRow(role, [], role, role.startswith("constraint")) for role in roles]
    effects = {k: [(sums[k][role] / counts[role]).tolist() for role in roles] for k in kinds}
    n = len(results)
    return TraceResult(
        method=results[0].method,
        kinds=kinds,
        window=results[0].window,
        rows=rows,
        effects=effects,
        p_clean=sum(r.p_clean for r in results) / n,
        p_corrupt=sum(r.p_corrupt for r in results) / n,
        answer="",
        question="",
        label=f"mean of {n} cases",
        cases=n,
        noise=results[0].noise,
        cells=sum(r.cells for r in results),
        forward_passes=sum(r.forward_passes for r in results),
        seconds=sum(r.seconds for r in results),
    )
