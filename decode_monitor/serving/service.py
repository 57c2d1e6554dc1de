"""The decode service: a bounded queue, one worker thread that owns the GPU, one response each.

The caller (the ROS node) hands in raw request strings and gets JSON strings back through the
`publish_stream` / `publish_response` callbacks. Nothing here blocks the caller on the GPU.
"""
from collections import deque
from dataclasses import dataclass
import threading
import time

import numpy as np

from decode_monitor.engine.sampling import SamplingParams
from decode_monitor.serving.protocol import Limits, parse_request, RequestError, response
from decode_monitor.serving.text import TextStream
from decode_monitor.telemetry.window import StepWindow

LOADING, READY, FAILED = 'loading', 'ready', 'failed'


@dataclass
class Counters:
    received: int = 0
    served: int = 0
    rejected: int = 0  # answered with an error before decoding (bad input, queue full)
    cancelled: int = 0
    errors: int = 0  # failed while decoding


class _Job:
    def __init__(self, request, received):
        self.request = request
        self.received = received
        self.cancelled = False


class DecodeService:
    def __init__(self, load_decoder, publish_stream, publish_response, on_step=None,
                 limits=Limits(), queue_size=16, request_timeout_s=0.0, window=512):
        self._load_decoder = load_decoder
        self._publish_stream = publish_stream
        self._publish_response = publish_response
        self._on_step = on_step
        self.limits = limits
        self.queue_size = queue_size
        self.request_timeout_s = request_timeout_s
        self.window = StepWindow(window)
        self.counters = Counters()
        self.state = LOADING
        self.load_error = None
        self.decoder = None
        self._ttft_ms = deque(maxlen=64)
        self._queue = deque()
        self._active = None
        self._finished_ids = deque(maxlen=256)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name='decode-worker', daemon=True)

    # -- called from the node's threads -----------------------------------------------------
    def start(self):
        self._thread.start()

    def submit(self, raw):
        """Queue a request, or answer it with an error at once. Never blocks on decoding."""
        with self._lock:
            self.counters.received += 1
        try:
            request = parse_request(raw, self.limits)
        except RequestError as exc:
            self._reject(exc.request_id, str(exc))
            return
        with self._lock:
            busy_ids = {job.request.id for job in self._queue}
            if self._active is not None:
                busy_ids.add(self._active.request.id)
            if request.id in busy_ids:
                error = f'duplicate id {request.id!r}: a request with this id is still pending'
            elif self._stopping:
                error = 'the node is shutting down'
            elif len(self._queue) >= self.queue_size:
                error = f'queue full ({self.queue_size} waiting); retry later'
            else:
                self._queue.append(_Job(request, time.monotonic()))
                self._wake.notify()
                return
        self._reject(request.id, error)

    def cancel(self, request_id):
        request_id = request_id.strip()
        with self._lock:
            for job in self._queue:
                if job.request.id == request_id:
                    self._queue.remove(job)
                    break
            else:
                job = None
                if self._active is not None and self._active.request.id == request_id:
                    self._active.cancelled = True  # the worker answers when it notices
                    return
        if job is not None:
            self._finish(request_id, 'cancelled', error='cancelled while queued', tokens=0)
            return
        known = request_id in self._finished_ids
        reason = 'already finished' if known else 'no queued or running request has this id'
        self._publish_response(response(request_id, 'error', error=f'cancel: {reason}',
                                        cancel=True))

    def stop(self, timeout=10.0):
        with self._lock:
            self._stopping = True
            if self._active is not None:
                self._active.cancelled = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self):
        """A consistent copy of what diagnostics report."""
        with self._lock:
            return dict(state=self.state, load_error=self.load_error,
                        queue_depth=len(self._queue), active=self._active is not None,
                        counters=Counters(**vars(self.counters)),
                        ttft_p50_ms=float(np.median(self._ttft_ms)) if self._ttft_ms else None)

    # -- the worker thread ------------------------------------------------------------------
    def _run(self):
        try:
            decoder = self._load_decoder()
            with self._lock:
                self.decoder, self.state = decoder, READY
        except Exception as exc:  # the node must stay up and say why
            with self._lock:
                self.state, self.load_error = FAILED, f'{type(exc).__name__}: {exc}'
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    pending, self._queue = list(self._queue), deque()
                    break
                job = self._active = self._queue.popleft()
            try:
                self._serve(job)
            finally:
                with self._lock:
                    self._active = None
        for job in pending:
            self._finish(job.request.id, 'cancelled', error='the node is shutting down', tokens=0)

    def _serve(self, job):
        request = job.request
        if self.state != READY:
            self._finish(request.id, 'error', error=f'model not loaded: {self.load_error}',
                         tokens=0)
            return
        decoder = self.decoder
        tokenizer = decoder.loaded.tokenizer
        try:
            prompt_ids = encode_prompt(tokenizer, request)
        except Exception as exc:
            self._finish(request.id, 'error', error=f'cannot tokenise the prompt: {exc}')
            return
        budget = decoder.max_context - len(prompt_ids)
        if request.max_new_tokens > budget:
            self._finish(request.id, 'error', tokens=0, error=(
                f'prompt of {len(prompt_ids)} tokens + max_new_tokens '
                f'{request.max_new_tokens} exceeds max_context {decoder.max_context}'))
            return
        deadline = (job.received + self.request_timeout_s) if self.request_timeout_s else None
        stream = TextStream(tokenizer, request.stop)
        params = SamplingParams(request.temperature, request.top_p, request.top_k, request.seed)
        step_ms, tokens, ttft_ms, reason = [], 0, None, 'length'

        def should_stop():
            return job.cancelled or (deadline is not None and time.monotonic() > deadline)
        try:
            for step in decoder.generate(prompt_ids, params, request.max_new_tokens,
                                         decoder.loaded.stop_token_ids, should_stop):
                if step.index == 0:
                    ttft_ms = (time.monotonic() - job.received) * 1e3
                else:
                    step_ms.append(step.step_ms)
                    self.window.add(step.step_ms, step.pos, decoder.floor.bytes_per_step(step.pos))
                    if self._on_step is not None:
                        self._on_step(step.step_ms)
                if step.token in decoder.loaded.stop_token_ids:
                    reason = 'stop'
                    break
                tokens += 1
                chunk = stream.push(step.token)
                if chunk:
                    self._publish_stream(request.id, step.index, chunk)
                if stream.stopped:
                    reason = 'stop'
                    break
                if should_stop():
                    break
        except Exception as exc:  # CUDA OOM and friends: answer, then serve the next request
            self._finish(request.id, 'error', text=stream.text, tokens=tokens,
                         error=f'decoding failed: {type(exc).__name__}: {exc}')
            return
        tail = stream.flush()
        if tail:
            self._publish_stream(request.id, tokens, tail)
        with self._lock:
            if ttft_ms is not None:
                self._ttft_ms.append(ttft_ms)
        extra = dict(tokens=tokens, prompt_tokens=len(prompt_ids),
                     ttft_ms=_round(ttft_ms),
                     step_ms_p50=_round(float(np.median(step_ms))) if step_ms else None,
                     mode=decoder.mode)
        if job.cancelled:
            self._finish(request.id, 'cancelled', text=stream.text, error='cancelled', **extra)
        elif deadline is not None and time.monotonic() > deadline:
            self._finish(request.id, 'error', text=stream.text, **extra,
                         error=f'timed out after {self.request_timeout_s} s')
        else:
            self._finish(request.id, 'done', text=stream.text, finish_reason=reason, **extra)

    def _reject(self, request_id, error):
        with self._lock:
            self.counters.rejected += 1
        self._publish_response(response(request_id, 'error', error=error, tokens=0))

    def _finish(self, request_id, status, text='', error=None, **fields):
        with self._lock:
            if status == 'done':
                self.counters.served += 1
            elif status == 'cancelled':
                self.counters.cancelled += 1
            else:
                self.counters.errors += 1
            self._finished_ids.append(request_id)
        self._publish_response(response(request_id, status, text, error, **fields))


def encode_prompt(tokenizer, request):
    """Token ids for a request: the chat template for messages (or a plain prompt, by default,
    when the model has a template), else the raw text."""
    has_template = bool(getattr(tokenizer, 'chat_template', None))
    use_chat = request.chat if request.chat is not None else has_template
    messages = request.messages
    if messages is None and use_chat and has_template:
        messages = [{'role': 'user', 'content': request.prompt}]
    if messages is not None:
        if not has_template:
            raise ValueError('the model has no chat template; send "prompt" instead')
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return list(tokenizer.encode(request.prompt, add_special_tokens=False))


def _round(value, digits=3):
    return None if value is None else round(value, digits)
