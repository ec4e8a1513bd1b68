"""Generate and GenerateStream: greedy answers with a request's version attached in its own thread.

Generation is not a job: it runs in the RPC's thread (the stream in a worker
thread of its own), beside any edit or diagnostic, with the version's edits
attached for that thread only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from editlens.v1 import editlens_pb2 as pb

from vlm.prompts import EncodedPrompt

from .bundles import Bundle, attached
from .errors import JobCancelled
from .host import Host


@dataclass
class GenerationPlan:
    """A checked Generate request: its prompt, answer length and the version resolved for it."""

    prompt: EncodedPrompt
    new_tokens: int
    served: pb.Served
    bundle: Bundle | None


def plan_generation(host: Host, request: pb.GenerateRequest) -> GenerationPlan:
    """Check a Generate request and resolve its version once (used for the whole answer)."""
    question = host.inputs.text(request.prompt, "prompt")
    n = host.inputs.new_tokens(request.max_new_tokens)
    image = host.inputs.image(request.image, required=False)
    prompt = host.inputs.encode(question, image=image)
    served, bundle = host.versions.resolve(request.adapter)
    return GenerationPlan(prompt, n, served, bundle)


def _generate_kwargs(vlm, plan: GenerationPlan) -> dict:
    tok, prompt = vlm.tokenizer, plan.prompt
    kwargs = {
        "input_ids": prompt.input_ids[None].to(vlm.input_device),
        "attention_mask": torch.ones(1, prompt.length, dtype=torch.long, device=vlm.input_device),
        "max_new_tokens": plan.new_tokens,
        "do_sample": False,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if prompt.pixel_values is not None:
        kwargs["pixel_values"] = prompt.pixel_values[None].to(vlm.input_device, vlm.dtype)
    return kwargs


def generate(host: Host, plan: GenerationPlan) -> tuple[str, int]:
    """The greedy answer (special tokens removed) and how many answer tokens it has."""
    vlm = host.vlm
    with torch.no_grad(), attached(vlm, plan.bundle):
        out = vlm.model.generate(**_generate_kwargs(vlm, plan))
    ids = out[0, plan.prompt.length :].tolist()
    special = set(vlm.tokenizer.all_special_ids)
    return vlm.tokenizer.decode(ids, skip_special_tokens=True).strip(), sum(1 for i in ids if i not in special)


class _Streamer:
    """transformers' streamer protocol: ``put(ids)`` per step (the prompt first), ``end()``; each new piece of
    text goes to ``events`` as ("chunk", text, tokens so far)."""

    def __init__(self, tokenizer, events: queue.Queue, stop: threading.Event):
        self.tok, self.events, self.stop = tokenizer, events, stop
        self.special = set(tokenizer.all_special_ids)
        self.prompt_seen, self.ids, self.sent = False, [], ""

    def put(self, value) -> None:
        if self.stop.is_set():
            raise JobCancelled("the client went away")
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += [i for i in value.reshape(-1).tolist() if i not in self.special]
        text = self.tok.decode(self.ids, skip_special_tokens=True).strip()
        delta = text[len(self.sent) :] if text.startswith(self.sent) else text
        if delta:  # the chunks concatenate to the final text
            self.events.put(("chunk", delta, len(self.ids)))
        self.sent = text

    def end(self) -> None:
        pass


def stream(host: Host, plan: GenerationPlan, context) -> Iterator[pb.GenerateChunk]:
    """The answer as ``GenerateChunk``s; stops generating when the client goes away."""
    vlm = host.vlm
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            with torch.no_grad(), attached(vlm, plan.bundle):  # hooks of this thread only
                vlm.model.generate(**_generate_kwargs(vlm, plan), streamer=_Streamer(vlm.tokenizer, events, stop))
            events.put(("end", None, 0))
        except BaseException as exc:  # reported to the RPC thread, which turns it into a status
            events.put(("error", exc, 0))

    threading.Thread(target=work, name="editlens-stream", daemon=True).start()
    context.add_callback(stop.set)
    first, count = True, 0
    try:
        while True:
            try:
                kind, payload, count_now = events.get(timeout=0.25)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if kind == "chunk":
                count = count_now
                yield pb.GenerateChunk(text=payload, served=plan.served if first else None, answer_tokens=count)
                first = False
            elif kind == "end":
                yield pb.GenerateChunk(served=plan.served if first else None, done=True, answer_tokens=count)
                return
            else:
                raise payload
    finally:
        stop.set()
