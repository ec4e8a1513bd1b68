"""Generate and GenerateStream: greedy answers of the request's version, batched with concurrent requests.

Generation is not a job: it is served beside any edit or diagnostic. With
batching on (``--max-batch-size`` > 1, the default) a request is handed to
the host's ``Batcher`` (``server.batching``): concurrent requests of any
versions share one forward pass per decoding step, each row with its own
version's edits. With ``--max-batch-size 1`` each request is decoded by
itself in the RPC's thread (the stream in a worker thread of its own) with
the version's edits attached for that thread only; the answers are the same
(tested). Both paths decode with ``vlm.decoding.greedy_batch``, which passes
positions explicitly, so concurrent requests share no state on the model (an
M-RoPE model's forward given no positions reads the ``rope_deltas`` the last
prompt left on the module).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from editlens.v1 import editlens_pb2 as pb

from vlm.decoding import DecodeRow, greedy_batch
from vlm.prompts import EncodedPrompt

from .batching import Ticket
from .bundles import Bundle, attached
from .errors import JobCancelled
from .host import Host


@dataclass
class GenerationPlan:
    """A checked Generate request: its prompt, answer length, the version resolved for it and, with
    batching, its place in the batcher's queue (``ticket``)."""

    prompt: EncodedPrompt
    new_tokens: int
    served: pb.Served
    bundle: Bundle | None
    ticket: Ticket | None = None


def start_generation(host: Host, request: pb.GenerateRequest) -> GenerationPlan:
    """Check a Generate request, resolve its version once (used for the whole answer) and, when the host
    batches, queue it for the next batch (which waits, briefly, for requests still being read like this)."""
    with host.batcher.arriving() if host.batcher is not None else contextlib.nullcontext():
        question = host.inputs.text(request.prompt, "prompt")
        n = host.inputs.new_tokens(request.max_new_tokens)
        image = host.inputs.image(request.image, required=False)
        prompt = host.inputs.encode(question, image=image)
        served, bundle = host.versions.resolve(request.adapter)
        plan = GenerationPlan(prompt, n, served, bundle)
        if host.batcher is not None:
            plan.ticket = host.batcher.submit(prompt, n, bundle)
    return plan


def _decode_alone(vlm, plan: GenerationPlan, on_token=None, cancelled=None) -> list[int]:
    """One request's greedy answer ids, decoded by itself with its version's edits attached for this thread."""
    row = DecodeRow(plan.prompt, plan.new_tokens, on_token=on_token, cancelled=cancelled)
    with attached(vlm, plan.bundle):
        return greedy_batch(vlm, [row])[0]


def answer_text(tokenizer, ids: list[int]) -> tuple[str, int]:
    """An answer's text (special tokens removed) and how many answer tokens it has."""
    special = set(tokenizer.all_special_ids)
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), sum(1 for i in ids if i not in special)


def generate(host: Host, plan: GenerationPlan, context=None) -> tuple[str, int]:
    """The greedy answer (special tokens removed) and how many answer tokens it has; batched with concurrent
    requests when the host has a batcher (a client that goes away leaves its batch)."""
    vlm = host.vlm
    if plan.ticket is not None:
        ticket = plan.ticket
        if context is not None:
            context.add_callback(ticket.cancel)
        ids = ticket.answer(active=context.is_active if context is not None else lambda: True)
        if ticket.cancelled.is_set():
            raise JobCancelled("the client went away")
        return answer_text(vlm.tokenizer, ids)
    return answer_text(vlm.tokenizer, _decode_alone(vlm, plan))


class TextDeltas:
    """Answer tokens in, new text out: ``push(ids)`` returns the text the new tokens add (special tokens
    removed; the pieces concatenate to the final text) and ``count`` the answer tokens so far."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.ids: list[int] = []
        self.sent = ""

    @property
    def count(self) -> int:
        return len(self.ids)

    def push(self, ids) -> str:
        self.ids += [i for i in ids if i not in self.special]
        text = self.tok.decode(self.ids, skip_special_tokens=True).strip()
        delta = text[len(self.sent) :] if text.startswith(self.sent) else text
        self.sent = text
        return delta


def _stream_batched(host: Host, plan: GenerationPlan, context) -> Iterator[pb.GenerateChunk]:
    ticket = plan.ticket
    context.add_callback(ticket.cancel)
    text, first = TextDeltas(host.vlm.tokenizer), True
    try:
        for token in ticket.tokens(active=context.is_active):
            delta = text.push([token])
            if delta:
                yield pb.GenerateChunk(text=delta, served=plan.served if first else None, answer_tokens=text.count)
                first = False
        if not ticket.cancelled.is_set():
            yield pb.GenerateChunk(served=plan.served if first else None, done=True, answer_tokens=text.count)
    finally:
        ticket.cancel()  # a no-op once the answer is complete; a stream closed early leaves its batch


def stream(host: Host, plan: GenerationPlan, context) -> Iterator[pb.GenerateChunk]:
    """The answer as ``GenerateChunk``s; stops generating when the client goes away."""
    if plan.ticket is not None:
        yield from _stream_batched(host, plan, context)
        return
    vlm = host.vlm
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    text = TextDeltas(vlm.tokenizer)

    def on_token(token: int) -> None:
        delta = text.push([token])
        if delta:
            events.put(("chunk", delta, text.count))

    def work() -> None:
        try:
            _decode_alone(vlm, plan, on_token, stop.is_set)  # hooks of this thread only
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
