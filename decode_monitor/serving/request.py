"""One request on the worker: tokenise, check the context budget, decode, stream, say the answer.

The service owns the queue, the lifecycle and answering each request exactly once; this module
owns what happens between taking a job off the queue and answering it. It publishes stream
chunks as they come but returns the answer as an `Outcome` instead of publishing it, so every
answer still goes through the service's one guarded `_finish` (a race with shutdown cannot answer
twice) and the service's statistics stay under its lock.
"""
from dataclasses import dataclass, field
import time

import numpy as np

from decode_monitor.engine.sampling import SamplingParams
from decode_monitor.serving.prompt import encode_prompt
from decode_monitor.serving.text import TextStream


class Job:
    """A queued or running request; `cancelled` and `abort` are set from the node's threads."""

    def __init__(self, request, received):
        self.request = request
        self.received = received
        self.cancelled = False  # the client cancelled it
        self.abort = None  # the node ends it: the error text
        self.answered = False


@dataclass
class Outcome:
    """The answer to publish (status, text, error, response fields) and, for a decode that
    produced its first token and ended normally, (ttft ms, prompt tokens, cached of those)."""
    status: str
    text: str = ''
    error: str | None = None
    fields: dict = field(default_factory=dict)
    first_token: tuple | None = None


def decode(job, decoder, system_prompt, timeout_s, window, publish_stream, on_step=None):
    """Decode `job` with a loaded `decoder`; `publish_stream(id, index, text)` gets the chunks
    (the stream adds up to the answer's text), `on_step(ms)` each step after the first."""
    request = job.request
    tokenizer = decoder.loaded.tokenizer
    try:
        prompt_ids = encode_prompt(tokenizer, request, system_prompt)
    except Exception as exc:
        return Outcome('error', error=f'cannot tokenise the prompt: {exc}')
    budget = decoder.max_context - len(prompt_ids)
    if request.max_new_tokens > budget:
        return Outcome('error', fields=dict(tokens=0), error=(
            f'prompt of {len(prompt_ids)} tokens + max_new_tokens '
            f'{request.max_new_tokens} exceeds max_context {decoder.max_context}'))
    deadline = (job.received + timeout_s) if timeout_s else None
    stream = TextStream(tokenizer, request.stop)
    params = SamplingParams(request.temperature, request.top_p, request.top_k, request.seed)
    stop_ids = decoder.loaded.stop_token_ids
    step_ms, tokens, ttft_ms, reason = [], 0, None, 'length'

    def should_stop():
        return (job.cancelled or job.abort is not None
                or (deadline is not None and time.monotonic() > deadline))
    try:
        for step in decoder.generate(prompt_ids, params, request.max_new_tokens, stop_ids,
                                     should_stop):
            if step.index == 0:
                ttft_ms = (time.monotonic() - job.received) * 1e3
            else:
                step_ms.append(step.step_ms)
                window.add(step.step_ms, step.pos, decoder.floor.bytes_per_step(step.pos))
                if on_step is not None:
                    on_step(step.step_ms)
            if step.token in stop_ids:
                reason = 'stop'
                break
            tokens += 1
            chunk = stream.push(step.token)
            if chunk:
                publish_stream(request.id, step.index, chunk)
            if stream.stopped:
                reason = 'stop'
                break
            if should_stop():
                break
    except Exception as exc:  # CUDA OOM and friends: answer, then serve the next request
        _flush(publish_stream, request.id, tokens, stream)
        return Outcome('error', stream.text, fields=dict(tokens=tokens),
                       error=f'decoding failed: {type(exc).__name__}: {exc}')
    _flush(publish_stream, request.id, tokens, stream)
    cached = decoder.last_cached_tokens if ttft_ms is not None else 0
    first = (ttft_ms, len(prompt_ids), cached) if ttft_ms is not None else None
    fields = dict(tokens=tokens, prompt_tokens=len(prompt_ids), cached_prompt_tokens=cached,
                  ttft_ms=_round(ttft_ms),
                  step_ms_p50=_round(float(np.median(step_ms))) if step_ms else None,
                  mode=decoder.mode)
    if job.abort is not None:
        return Outcome('error', stream.text, job.abort, fields, first)
    if job.cancelled:
        return Outcome('cancelled', stream.text, 'cancelled', fields, first)
    if deadline is not None and time.monotonic() > deadline:
        return Outcome('error', stream.text, f'timed out after {timeout_s} s', fields, first)
    return Outcome('done', stream.text, None, dict(finish_reason=reason, **fields), first)


def _flush(publish_stream, request_id, index, stream):
    """Stream what the text stream held back (a possible stop string's start, an incomplete
    UTF-8 sequence): before the response, so the stream adds up to the response's text."""
    tail = stream.flush()
    if tail:
        publish_stream(request_id, index, tail)


def _round(value, digits=3):
    return None if value is None else round(value, digits)
