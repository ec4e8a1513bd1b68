"""Answer scoring and greedy generation.

``score_answers`` is teacher-forced: the answer follows the prompt in the
input, and at each answer token we read log P(token | everything before) and
whether that token is the argmax. A whole answer's log-probability is the sum
over all of its tokens. Rows are batched (right padding) and the LM head runs
only at the positions that predict answer tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .decoding import DecodeRow, greedy_batch
from .images import ImageInput
from .loading import VLM
from .patching import Knockout, Patch, run_patched
from .prompts import EncodedPrompt, collate, encode


@dataclass
class AnswerScore:
    logprob: float  # sum of log P over the answer tokens
    token_logprobs: list[float]
    token_correct: list[bool]  # argmax == answer token (teacher-forced)
    predicted_ids: list[int]

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)

    @property
    def token_accuracy(self) -> float:
        return sum(self.token_correct) / len(self.token_correct)

    @property
    def exact(self) -> bool:
        return all(self.token_correct)


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    """Consecutive chunks of ``items`` of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def score_batch(
    vlm: VLM, prompts: Sequence[EncodedPrompt], patches: Sequence[Patch] = (), knockouts: Sequence[Knockout] = ()
) -> list[AnswerScore]:
    """Score one batch (one forward pass), optionally with interventions."""
    for p in prompts:
        if not p.answer_positions:
            raise ValueError("score_batch needs prompts encoded with an answer")
    inputs = collate(prompts, vlm.tokenizer.pad_token_id)
    run = run_patched(vlm, inputs, patches=patches, knockouts=knockouts)
    rows, pos, targets = [], [], []
    for i, p in enumerate(prompts):
        rows += [i] * len(p.answer_positions)
        pos += [a - 1 for a in p.answer_positions]
        targets += p.answer_ids
    logp = torch.log_softmax(run.logits_at(rows, pos), dim=-1)
    tgt = torch.tensor(targets, device=logp.device)
    tok_lp = logp.gather(1, tgt[:, None])[:, 0].tolist()
    pred = logp.argmax(-1).tolist()
    out, k = [], 0
    for p in prompts:
        n = len(p.answer_positions)
        lp, pr = tok_lp[k : k + n], pred[k : k + n]
        out.append(AnswerScore(sum(lp), lp, [a == b for a, b in zip(pr, targets[k : k + n])], pr))
        k += n
    return out


def score_answers(vlm: VLM, prompts: Sequence[EncodedPrompt], batch_size: int = 32) -> list[AnswerScore]:
    """Teacher-forced scores of many prompts, batched."""
    out: list[AnswerScore] = []
    for chunk in batches(prompts, batch_size):
        out += score_batch(vlm, chunk)
    return out


@torch.no_grad()
def generate(vlm: VLM, prompts: Sequence[EncodedPrompt], max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy answers (decoded, special tokens removed) for prompts without answers, ``batch_size`` rows decoded
    together (``vlm.decoding.greedy_batch``: the answers each prompt gets alone; positions passed explicitly,
    so nothing is left on the model between calls)."""
    tok = vlm.tokenizer
    results: list[str] = []
    for chunk in batches(prompts, batch_size):
        for ids in greedy_batch(vlm, [DecodeRow(p, max_new_tokens) for p in chunk]):
            results.append(tok.decode(ids, skip_special_tokens=True).strip())
    return results


def ask(vlm: VLM, question: str, image: ImageInput | None = None, max_new_tokens: int = 16) -> str:
    """Convenience: greedy answer to one question."""
    return generate(vlm, [encode(vlm.processor, question, image=image)], max_new_tokens)[0]
