"""Attention contributions (Basu et al. §3.3, eq. 1–2) and the early-failure score (App. H).

The contribution of token j to token i at layer ℓ is the norm of what j
writes into i through the attention block:

    a_ij^ℓ = ‖ Σ_h A_ij^{ℓ,h} (x_j W_v^{ℓ,h}) W_o^{ℓ,h} ‖

with x the normed layer input and A the attention probabilities (grouped
key/value heads are repeated to the query heads; biases of v_proj are
included, o_proj's bias is not: it does not depend on j).

Views:
* ``visual``: every visual token → the constraint's last token, per layer
  (Basu Fig. 5: which visual tokens feed the early causal MLPs);
* ``constraint``: every constraint token → the last prompt position, per
  layer (Fig. 15–16: the middle layers move the answer to the last token);
* the early-failure score: the mean over chosen middle layers of the
  contribution of the constraint's last token to the last position, beside
  the model's confidence (P of its predicted token); over a set of cases,
  the AUROC of each for telling correct from incorrect answers (Fig. 17).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from vlm.loading import VLM
from vlm.patching import eager_attention, run_patched
from vlm.prompts import collate

from .cases import DiagnosticCase, Prepared, prepare
from .engine import MODES
from .errors import DiagnosticError


@dataclass
class ContributionResult:
    visual: list[list[float]]  # image tokens × layers: → constraint's last token
    constraint: list[list[float]]  # constraint tokens × layers: → last position
    constraint_tokens: list[str]
    early_layers: list[int]
    early_score: float  # mean of constraint-last → last over early_layers
    confidence: float  # P(predicted token)
    correct: bool | None  # prediction starts the ground truth
    answer: str
    question: str
    image_grid: tuple[int, int]
    label: str = ""
    cases: int = 1
    seconds: float = 0.0
    auroc: dict[str, float] = field(default_factory=dict)  # over a set: early_score / confidence
    roc: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def default_early_layers(num_layers: int) -> list[int]:
    """The two layers at half depth (16 and 17 of LLaVA-7B's 32, as in the paper)."""
    return [num_layers // 2, min(num_layers - 1, num_layers // 2 + 1)]


def _layer_weights(vlm: VLM, layer: int):
    arch = vlm.arch
    v = vlm.module(arch.layer_path(layer, arch.v_proj))
    o = vlm.module(arch.layer_path(layer, arch.o_proj))
    return v, o


def _value_out(vlm: VLM, layer: int, x: torch.Tensor, heads: int) -> torch.Tensor:
    """(H, T, d): what each position j writes through each head, (x_j W_v^h) W_o^h."""
    v, o = _layer_weights(vlm, layer)
    vals = v(x)  # (T, H_kv * dh)
    T = x.shape[0]
    dh = o.weight.shape[1] // heads
    kv = vals.shape[-1] // dh
    vals = vals.view(T, kv, dh).repeat_interleave(heads // kv, dim=1)  # (T, H, dh)
    wo = o.weight.view(o.weight.shape[0], heads, dh)  # (d, H, dh)
    return torch.einsum("thk,dhk->htd", vals, wo)


def contributions_matrix(
    vlm: VLM, prep: Prepared, targets: Sequence[int], sources: Sequence[int], mode: str = "batched"
) -> torch.Tensor:
    """(len(targets), len(sources), L) contribution norms a_ij^ℓ."""
    if mode not in MODES:
        raise DiagnosticError(f"engine mode must be one of {MODES}, not {mode!r}")
    L = vlm.num_layers
    heads = vlm.text_config.num_attention_heads
    inputs = collate([prep.prompt], vlm.tokenizer.pad_token_id)
    out = torch.zeros(len(targets), len(sources), L)
    if mode != "naive":  # one eager pass captures every layer's input and probabilities
        caps = [(k, l) for l in range(L) for k in ("attn_in", "attn_probs")]
        with eager_attention(vlm):
            run = run_patched(vlm, inputs, capture=caps)
        with torch.no_grad():
            for l in range(L):
                x = run.captured[("attn_in", l)][0]
                A = run.captured[("attn_probs", l)][0].float()  # (H, T, T)
                vo = _value_out(vlm, l, x, heads).float()  # (H, T, d)
                t = torch.as_tensor(list(targets))
                s = torch.as_tensor(list(sources))
                w = A[:, t][:, :, s]  # (H, nt, ns)
                vec = torch.einsum("hij,hjd->ijd", w, vo[:, s])
                out[:, :, l] = vec.norm(dim=-1)
        return out
    # naive reference: one eager forward pass per layer, one (i, j) pair and one head at a time
    with torch.no_grad():
        for l in range(L):
            with eager_attention(vlm):
                run = run_patched(vlm, inputs, capture=[("attn_in", l), ("attn_probs", l)], stop_after_layer=l)
            x = run.captured[("attn_in", l)][0]
            A = run.captured[("attn_probs", l)][0].float()
            v, o = _layer_weights(vlm, l)
            dh = o.weight.shape[1] // heads
            for a, i in enumerate(targets):
                for b, j in enumerate(sources):
                    vj = v(x[j : j + 1])[0]
                    kv = vj.shape[0] // dh
                    total = torch.zeros(o.weight.shape[0])
                    for h in range(heads):
                        g = h // (heads // kv)
                        total += A[h, i, j] * (
                            o.weight[:, h * dh : (h + 1) * dh].float() @ vj[g * dh : (g + 1) * dh].float()
                        )
                    out[a, b, l] = total.norm()
    return out


def attention_contributions(
    vlm: VLM, case: DiagnosticCase | Prepared, early_layers: Sequence[int] | None = None, mode: str = "batched"
) -> ContributionResult:
    """Attention contributions (Basu eq. 1-2): visual tokens -> the constraint's last token and constraint tokens ->
    the last position, per layer, with the early-failure score."""
    t0 = time.perf_counter()
    L = vlm.num_layers
    early = list(early_layers) if early_layers is not None else default_early_layers(L)
    bad = [l for l in early if not 0 <= l < L]
    if bad or not early:
        raise DiagnosticError(f"early-failure layers {bad or early} outside 0..{L - 1}")
    prep = case if isinstance(case, Prepared) else prepare(vlm, case)
    p = prep.prompt
    c0, c1 = p.constraint_spans[0]
    cl, last = c1 - 1, p.last_prompt_pos
    img = p.image_positions
    constraint = list(range(c0, c1))
    m = contributions_matrix(vlm, prep, [cl, last], img + constraint, mode)
    visual = m[0, : len(img)]  # image → constraint last
    to_last = m[1, len(img) :]  # constraint → last
    early_score = float(to_last[-1, early].mean())
    return ContributionResult(
        visual=visual.tolist(),
        constraint=to_last.tolist(),
        constraint_tokens=[prep.tokens[i] for i in constraint],
        early_layers=early,
        early_score=early_score,
        confidence=float(_confidence(vlm, prep)),
        correct=prep.correct,
        answer=prep.target_token,
        question=p.question,
        image_grid=p.image_grid,
        label=prep.case.label,
        seconds=time.perf_counter() - t0,
    )


def _confidence(vlm: VLM, prep: Prepared) -> float:
    run = run_patched(vlm, collate([prep.prompt], vlm.tokenizer.pad_token_id))
    return float(torch.softmax(run.logits_at([0], [prep.last])[0], dim=-1).max())


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (Mann–Whitney U, ties counted half). NaN if one class is missing."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(false positive rate, true positive rate) points of ``scores`` against ``labels``."""
    P = sum(labels)
    N = len(labels) - P
    fpr, tpr = [0.0], [0.0]
    for thr in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, labels) if y and s >= thr)
        fp = sum(1 for s, y in zip(scores, labels) if not y and s >= thr)
        fpr.append(fp / N if N else 0.0)
        tpr.append(tp / P if P else 0.0)
    return fpr, tpr


def average_contributions(results: Sequence[ContributionResult]) -> ContributionResult:
    """Mean views over cases (constraint rows aligned from the constraint's last token back)
    and the AUROC of the early-failure score and of the confidence over the cases' correctness."""
    if not results:
        raise DiagnosticError("nothing to average")
    n = len(results)
    if any(tuple(r.image_grid) != tuple(results[0].image_grid) for r in results):
        raise DiagnosticError(
            "the cases' images have different token grids: average attention contributions of images of one size only"
        )
    visual = torch.stack([torch.tensor(r.visual) for r in results]).mean(0)
    k = min(len(r.constraint) for r in results)
    constraint = torch.stack([torch.tensor(r.constraint[-k:]) for r in results]).mean(0)
    labelled = [r for r in results if r.correct is not None]
    labels = [bool(r.correct) for r in labelled]
    aucs, rocs = {}, {}
    for name in ("early_score", "confidence"):
        s = [getattr(r, name) for r in labelled]
        aucs[name] = auroc(s, labels)
        rocs[name] = roc_curve(s, labels)
    first = results[0]
    return ContributionResult(
        visual=visual.tolist(),
        constraint=constraint.tolist(),
        constraint_tokens=[f"constraint[{i - k}]" for i in range(k)],
        early_layers=first.early_layers,
        early_score=sum(r.early_score for r in results) / n,
        confidence=sum(r.confidence for r in results) / n,
        correct=None,
        answer="",
        question="",
        image_grid=first.image_grid,
        label=f"mean of {n} cases",
        cases=n,
        seconds=sum(r.seconds for r in results),
        auroc=aucs,
        roc=rocs,
    )
