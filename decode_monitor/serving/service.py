"""The decode service: a bounded queue, one worker thread that owns the GPU, one response each.

The caller (the ROS node) hands in raw request strings and gets JSON strings back through the
`publish_stream` / `publish_response` callbacks. Nothing here blocks the caller on the GPU.

The worker loads the decoder, serves requests and frees the decoder, so every CUDA call runs on
one thread. The service follows a managed node's states: `configure()` loads, `activate()`
serves, `deactivate()` and `shutdown()` answer every pending request with an error naming why,
`cleanup()` frees the model. Whatever happens, each request ends in exactly one response: a
job is answered at most once (under the lock), and a publish that fails is logged and counted,
never allowed to kill the worker. One request's decode, from prompt to answer, is
`serving.request`; this module is the queue, the lifecycle and the answers.
"""
from collections import deque
from dataclasses import dataclass
import gc
import threading
import time

import numpy as np

from decode_monitor.serving.prompt import standing_prefix
from decode_monitor.serving.protocol import (
    Limits, parse_request, RequestError, RequestIds, response)
from decode_monitor.serving.request import decode, Job
from decode_monitor.telemetry.window import StepWindow

UNCONFIGURED, LOADING, INACTIVE, READY, FAILED, STOPPED = (
    'unconfigured', 'loading', 'inactive', 'ready', 'failed', 'stopped')
SHUTTING_DOWN = 'the node is shutting down'


@dataclass
class Counters:
    received: int = 0
    served: int = 0
    rejected: int = 0  # answered with an error before decoding (bad input, queue full, state)
    cancelled: int = 0
    errors: int = 0  # failed while decoding, or ended by deactivate / shutdown
    publish_failures: int = 0


class DecodeService:
    def __init__(self, load_decoder, publish_stream, publish_response, on_step=None,
                 limits=Limits(), queue_size=16, request_timeout_s=0.0, window=512,
                 log_error=None, system_prompt=''):
        self._load_decoder = load_decoder
        self._publish_stream_cb = publish_stream
        self._publish_response_cb = publish_response
        self._on_step = on_step
        self._log_error = log_error or (lambda message: None)
        self.limits = limits
        self.queue_size = queue_size
        self.request_timeout_s = request_timeout_s
        self.system_prompt = system_prompt  # opens chats; pinned in the KV cache at load
        self.window = StepWindow(window)
        self.counters = Counters()
        self.state = UNCONFIGURED
        self.load_error = None
        self.worker_error = None
        self.decoder = None
        self.ids = RequestIds(taken=self._is_pending)
        self._hold = False  # queue requests until served (a start-up that will serve)
        self._inactive_reason = None
        self._ttft_ms = deque(maxlen=64)
        self._prompt_tokens = deque(maxlen=64)  # (prompt tokens, of which cached) per request
        self._queue = deque()
        self._active = None
        self._finished_ids = deque(maxlen=256)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._command = None  # 'load' or 'free', for the worker
        self._command_done = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name='decode-worker', daemon=True)

    # -- lifecycle, called from the node's threads -------------------------------------------
    def start(self, serve=True):
        """Start the worker; with serve, load at once and serve (requests queue meanwhile)."""
        self._thread.start()
        if serve:
            with self._lock:
                self._hold = True
            self.configure(wait=False)
            self.activate()

    def configure(self, wait=True, timeout=None):
        """Load the decoder on the worker. With wait, block until done; True when loaded."""
        self._ask('load')
        if wait:
            self._command_done.wait(timeout)
        return self.state in (INACTIVE, READY)

    def activate(self):
        """Serve: queued requests start as soon as the decoder is loaded."""
        with self._lock:
            self._hold = True
            self._inactive_reason = None
            if self.state == INACTIVE:
                self.state = READY
            self._wake.notify_all()

    def deactivate(self, reason='the node was deactivated'):
        """Stop serving: the running and every queued request end with `reason`."""
        with self._lock:
            self._hold = False
            self._inactive_reason = reason
            if self.state == READY:
                self.state = INACTIVE
        self._abort_pending(reason)

    def cleanup(self, wait=True, timeout=None):
        """Free the decoder (and its GPU memory) on the worker."""
        self.deactivate('the model is being freed (lifecycle cleanup)')
        self._ask('free')
        if wait:
            self._command_done.wait(timeout)

    def shutdown(self, timeout=10.0):
        """Refuse new requests, answer the running and all queued ones, stop the worker.

        Returns once every pending request has been answered (by the worker if it finishes its
        step within `timeout`, else here) and the worker has stopped or the timeout passed:
        True when the worker stopped (False: it is still inside a model load or a step).
        """
        with self._lock:
            self._stopping = True
            self._hold = False
            self._wake.notify_all()
        self._command_done.set()  # nobody waits for a load that shutdown abandons
        self._abort_pending(SHUTTING_DOWN, timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            self.state = STOPPED
        return not self._thread.is_alive()

    stop = shutdown

    def _ask(self, command):
        with self._lock:
            self._command = command
            self._command_done.clear()
            self._wake.notify_all()

    def _abort_pending(self, reason, timeout=10.0):
        with self._lock:
            queued, self._queue = list(self._queue), deque()
            active = self._active
            if active is not None:
                active.abort = reason
        for job in queued:
            self._finish(job, 'error', error=reason, tokens=0)
        if active is not None:  # the worker answers at its next token; if it is stuck, we do
            deadline = time.monotonic() + timeout
            while not active.answered and time.monotonic() < deadline:
                time.sleep(0.005)
            self._finish(active, 'error', error=reason)

    # -- requests, called from the node's threads -------------------------------------------
    def submit(self, raw):
        """Queue a request, or answer it with an error at once. Never blocks on decoding."""
        with self._lock:
            self.counters.received += 1
        try:
            request = parse_request(raw, self.limits, self.ids)
        except RequestError as exc:
            self._reject(exc.request_id, str(exc))
            return
        with self._lock:
            if self._pending(request.id):
                error = f'duplicate id {request.id!r}: a request with this id is still pending'
            elif self._stopping:
                error = SHUTTING_DOWN
            elif not self._hold and self.state != FAILED:
                error = self._inactive_reason or (
                    f'the node is {self.state} (lifecycle): not serving')
            elif len(self._queue) >= self.queue_size:
                error = f'queue full ({self.queue_size} waiting); retry later'
            else:
                self._queue.append(Job(request, time.monotonic()))
                self._wake.notify_all()
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
            self._finish(job, 'cancelled', error='cancelled while queued', tokens=0)
            return
        known = request_id in self._finished_ids
        reason = 'already finished' if known else 'no queued or running request has this id'
        self._publish_response(response(request_id, 'error', error=f'cancel: {reason}',
                                        cancel=True))

    def _is_pending(self, request_id):
        with self._lock:
            return self._pending(request_id)

    def _pending(self, request_id):  # with the lock held
        return (any(job.request.id == request_id for job in self._queue)
                or (self._active is not None and self._active.request.id == request_id))

    def snapshot(self):
        """A consistent copy of what diagnostics report."""
        with self._lock:
            alive = self._thread.is_alive() or self._thread.ident is None or self._stopping
            return dict(state=self.state, load_error=self.load_error,
                        worker_error=None if alive else (self.worker_error or 'not running'),
                        queue_depth=len(self._queue), active=self._active is not None,
                        counters=Counters(**vars(self.counters)),
                        ttft_p50_ms=_percentile(self._ttft_ms, 50),
                        ttft_p95_ms=_percentile(self._ttft_ms, 95),
                        prompt_cache_hit_rate=(
                            sum(c for _, c in self._prompt_tokens)
                            / sum(n for n, _ in self._prompt_tokens)
                            if self._prompt_tokens else None))

    # -- the worker thread ------------------------------------------------------------------
    def _run(self):
        try:
            while True:
                with self._lock:
                    while not (self._stopping or self._command or (
                            self._queue and self.state in (READY, FAILED))):
                        self._wake.wait()
                    if self._stopping:
                        return
                    command, self._command = self._command, None
                    job = None
                    if command is None:
                        job = self._active = self._queue.popleft()
                if command == 'load':
                    self._load()
                elif command == 'free':
                    self._free()
                else:
                    try:
                        self._serve(job)
                    except Exception as exc:  # a bug must not leave a request unanswered
                        self._log_error(f'request {job.request.id}: {type(exc).__name__}: {exc}')
                        self._finish(job, 'error', error=f'internal error: {exc}')
                    finally:
                        with self._lock:
                            self._active = None
        except BaseException as exc:  # seen in diagnostics as ERROR, never a silent stop
            self.worker_error = f'{type(exc).__name__}: {exc}'
            self._log_error(f'decode worker stopped: {self.worker_error}')
            raise

    def _load(self):
        with self._lock:
            if self.decoder is not None:
                self._command_done.set()
                return
            self.state, self.load_error = LOADING, None
        try:
            decoder = self._load_decoder()
            if self.system_prompt:
                decoder.pin(standing_prefix(decoder.loaded.tokenizer, self.system_prompt))
            with self._lock:
                self.decoder = decoder
                self.state = READY if self._hold else INACTIVE
        except Exception as exc:  # the node must stay up and say why
            with self._lock:
                self.state, self.load_error = FAILED, f'{type(exc).__name__}: {exc}'
        finally:
            with self._lock:
                self._wake.notify_all()
            self._command_done.set()

    def _free(self):
        with self._lock:
            self.decoder, self.state, self.load_error = None, UNCONFIGURED, None
            self._inactive_reason = None
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            self._command_done.set()

    def _serve(self, job):
        if self.state != READY:
            self._finish(job, 'error', error=f'model not loaded: {self.load_error}', tokens=0)
            return
        on_step = None if self._on_step is None else (lambda ms: self._call(self._on_step, ms))
        out = decode(job, self.decoder, self.system_prompt, self.request_timeout_s, self.window,
                     self._publish_stream, on_step)
        if out.first_token is not None:
            ttft_ms, prompt_tokens, cached = out.first_token
            with self._lock:
                self._ttft_ms.append(ttft_ms)
                self._prompt_tokens.append((prompt_tokens, cached))
        self._finish(job, out.status, out.text, out.error, **out.fields)

    # -- answers ------------------------------------------------------------------------------
    def _reject(self, request_id, error):
        with self._lock:
            self.counters.rejected += 1
            self._finished_ids.append(request_id)
        self._publish_response(response(request_id, 'error', error=error, tokens=0))

    def _finish(self, job, status, text='', error=None, **fields):
        """Answer a job, once: a second answer (a race with shutdown) is dropped."""
        with self._lock:
            if job.answered:
                return
            job.answered = True
            if status == 'done':
                self.counters.served += 1
            elif status == 'cancelled':
                self.counters.cancelled += 1
            else:
                self.counters.errors += 1
            self._finished_ids.append(job.request.id)
        self._publish_response(response(job.request.id, status, text, error, **fields))

    def _publish_response(self, body):
        self._call(self._publish_response_cb, body)

    def _publish_stream(self, request_id, index, text):
        self._call(self._publish_stream_cb, request_id, index, text)

    def _call(self, publish, *args):
        try:
            publish(*args)
        except Exception as exc:  # e.g. the ROS context went away: log, count, carry on
            with self._lock:
                self.counters.publish_failures += 1
            self._log_error(f'publish failed: {type(exc).__name__}: {exc}')


def _percentile(values, q):
    return float(np.percentile(values, q)) if values else None
