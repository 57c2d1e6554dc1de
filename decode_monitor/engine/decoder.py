"""The batch-1 decoder: static KV cache, prefill, one decode step, eager or CUDA-graph replay.

`batch=b` (a backend with `batched = True`: hf) steps b sequences at one position at once; such a
decoder times steps (time_steps, the bench's batch axis) and does not serve (generate).

The current token and position live in device tensors, so a step (forward + sampling) can be
captured once and replayed. The host launches step t+1 before reading token t, so detokenising
and publishing hide behind the GPU; the only host sync per step is that token read.
"""
from collections import deque
from dataclasses import dataclass
import time

import numpy as np
import torch

from decode_monitor.engine.floor import FloorModel
from decode_monitor.engine.fused.model import FusedBackend
from decode_monitor.engine.fused.persistent_model import PersistentBackend
from decode_monitor.engine.hf_backend import HFBackend
from decode_monitor.engine.sampling import SamplingParams, SamplingState
from decode_monitor.engine.sampling import sample_greedy, sample_stochastic

BACKENDS = {'hf': HFBackend, 'fused': FusedBackend, 'persistent': PersistentBackend}
MODES = ('eager', 'graph')
# Prompt lengths prefilled once when a decoder is built on a GPU (and one after a cached prefix):
# CUDA loads a kernel at its first launch and cuBLAS picks GEMM kernels by M, so without this the
# first request pays for loading the kernels its length selects. A backend whose eager prefill
# runs a bounded set of shapes warms all of them besides (warm_prefill_shapes: fused).
WARM_PREFILL = (1, 16, 128, 1024)


def _device_ids(ids, device):
    """A list of token ids as a (1, n) long tensor on `device`, through numpy: a prompt of
    thousands of ids converts a few times faster than through torch.tensor, and the host's
    time before the first kernel is time to first token."""
    return torch.from_numpy(np.fromiter(ids, dtype=np.int64, count=len(ids)))[None].to(device)


def _shared(a, b):
    """The length of the common prefix of two token lists."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


class ContextOverflow(ValueError):
    """The prompt plus the requested tokens do not fit in the static KV cache."""


@dataclass
class Step:
    index: int  # 0 for the token that prefill produced
    token: int
    pos: int  # position of the input token of the step that produced this one
    step_ms: float  # decode-step time; for index 0, the prefill time


def register_backend(name, factory):
    """Make `factory(model, max_context)` selectable as `backend=name` (experiments
    add backends this way; the product's are named in BACKENDS above).

    A factory whose `formats` lists weight formats besides 'bf16' is also called with
    `weights=`, and should then have `floor_model()`; the others serve the weights as loaded.
    One with `tunable = True` launches kernels whose configs come from a table: it is called
    with `kernel_configs=` (a table file, 'defaults', or None to look one up) and its
    `kernel_configs.source` names the table in use. One with `batched = True` takes `batch=`
    (b sequences a step); the others decode batch 1 only.
    """
    BACKENDS[name] = factory


class Decoder:
    def __init__(self, loaded, mode='graph', backend='hf', max_context=2048, weights='bf16',
                 kernel_configs=None, batch=1):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, not {mode!r}')
        if backend not in BACKENDS:
            raise ValueError(f'backend must be one of {sorted(BACKENDS)}, not {backend!r}')
        self.loaded = loaded
        self.device = loaded.model.device
        self.max_context = max_context
        factory = BACKENDS[backend]
        options = {'kernel_configs': kernel_configs} if getattr(factory, 'tunable', False) \
            else {}
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f'batch must be a positive integer, not {batch!r}')
        if batch > 1:
            if not getattr(factory, 'batched', False):
                able = ' or '.join(n for n, f in BACKENDS.items() if getattr(f, 'batched', False))
                raise ValueError(f'backend {backend!r} decodes batch 1 only, not batch {batch} '
                                 f'(batched: {able or "none registered"})')
            options['batch'] = batch
        self.batch = batch
        if weights == 'bf16':
            self.backend = factory(loaded.model, max_context, **options)
        elif weights in getattr(factory, 'formats', ()):
            self.backend = factory(loaded.model, max_context, weights=weights, **options)
        else:
            able = ' or '.join(name for name, f in BACKENDS.items()
                               if weights in getattr(f, 'formats', ()))
            raise ValueError(f'weights {weights!r} need backend {able or "(none registered)"} '
                             f'(backend {backend!r} serves the model as loaded)')
        self.weights = weights
        if hasattr(self.backend, 'floor_model'):
            self.floor = self.backend.floor_model()  # the bytes as this backend stores them
        else:
            self.floor = FloorModel.for_model(loaded.model, batch=batch)
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.sampling = SamplingState(self.device)
        self.mode_requested = mode
        self.mode = 'eager'
        self.fallback_reason = None
        self.graph_fallbacks = 0
        self._graphs = {}
        self._cuda = self.device.type == 'cuda'
        if self._cuda:
            self._host_tokens = torch.zeros(2, dtype=torch.long, pin_memory=True)
            # per slot: the step's start and end (timing), and the token's copy to the host
            self._events = [(torch.cuda.Event(enable_timing=True),
                             torch.cuda.Event(enable_timing=True), torch.cuda.Event())
                            for _ in range(2)]
        # Prompt caching: the tokens whose K/V sit in the cache at positions 0.. . A prompt that
        # starts with them prefills only from the first token that differs.
        self.cached_ids = []
        self.last_cached_tokens = 0  # how many prompt tokens the last generate() reused
        self.pinned_ids = []  # the pinned prefix (pin()); its K/V is kept in self._pinned_kv
        self._pinned_kv = None
        self.prefill_fallback_reason = None  # why short prefills are not captured (graph mode)
        self.warm_s = 0.0
        if mode == 'graph':
            self._capture_graphs()
        if self.mode == 'graph' and hasattr(self.backend, 'capture_prefill'):
            try:
                self.backend.capture_prefill()
            except Exception as exc:  # the prefill then runs eagerly, as it did before
                torch.cuda.synchronize()
                first_line = (str(exc).strip().splitlines() or [''])[0]
                self.prefill_fallback_reason = (
                    f'prefill capture failed: {type(exc).__name__}: {first_line}')
        if self._cuda:
            self._warm_prefill()

    @property
    def kernel_configs_source(self):
        """The kernel-config table the backend launches with (a file, or the defaults); None
        for a backend without one (hf)."""
        configs = getattr(self.backend, 'kernel_configs', None)
        return None if configs is None else configs.source

    # -- the step ---------------------------------------------------------------------------
    def _step(self, greedy):
        logits = self.backend.forward_one(self.token, self.pos)  # (batch, vocab)
        if greedy:
            next_token = sample_greedy(logits)
        else:
            next_token = sample_stochastic(logits, self.sampling, self.pos)
        self.token.copy_(next_token)
        self.pos.add_(1)

    def _capture_graphs(self):
        if not self._cuda:
            self._fall_back('CUDA graphs need a CUDA device; running eager on '
                            f'{self.device.type}')
            return
        saved_pos = int(self.pos)
        try:
            pool = None
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            # Warm up off the capture stream, as graphs require. A step that syncs with the host
            # cannot be captured, and a capture that fails half-way leaves torch's CUDA RNG
            # believing it is still capturing: catch such steps here, before any capture.
            # A batch above 1 only times greedy steps (generate() is batch 1): one graph.
            kinds = (True, False) if self.batch == 1 else (True,)
            sync_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode('error')
            try:
                with torch.cuda.stream(stream):
                    for greedy in kinds:
                        for _ in range(2):
                            self._seek(0)
                            self._step(greedy)
            finally:
                torch.cuda.set_sync_debug_mode(sync_mode)
            torch.cuda.current_stream().wait_stream(stream)
            for greedy in kinds:
                self._seek(0)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(greedy)
                pool = graph.pool()
                self._graphs[greedy] = graph
            self.mode = 'graph'
        except Exception as exc:  # capture fails in many ways; all of them mean "run eager"
            self._graphs.clear()
            torch.cuda.synchronize()
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ''
            self._fall_back(f'graph capture failed: {type(exc).__name__}: {first_line}')
        finally:
            self._seek(saved_pos)

    def _warm_prefill(self):
        t0 = time.perf_counter()
        with torch.no_grad():
            for n in WARM_PREFILL:
                if 2 * n < self.max_context:
                    ids = torch.zeros((1, n), dtype=torch.long, device=self.device)
                    self.backend.prefill(ids, 0)
                    self.backend.prefill(ids, n)  # new tokens after a cached prefix
            if hasattr(self.backend, 'warm_prefill_shapes'):
                self.backend.warm_prefill_shapes()
        torch.cuda.synchronize(self.device)
        self.warm_s = time.perf_counter() - t0  # start-up time spent warming
        self._seek(0)

    def _seek(self, pos):
        self.cached_ids = []  # steps outside generate() write K/V nobody asked for
        self.pos.fill_(pos)  # (a pinned prefix's K/V is kept aside, for the next prompt)
        self.backend.seek(pos)

    def _reusable(self, prompt_ids):
        """Prompt tokens whose K/V the cache already holds; the last one is always run again
        (its logits give the first new token). A prompt that starts with the pinned prefix
        gets the prefix's K/V put back first when a request without it overwrote them."""
        same = _shared(self.cached_ids, prompt_ids)
        pinned = len(self.pinned_ids)
        if pinned > same and _shared(self.pinned_ids, prompt_ids) == pinned:
            self.cached_ids = []  # what follows the prefix is about to be overwritten
            self.backend.load_prefix(self._pinned_kv)
            self.cached_ids, same = list(self.pinned_ids), pinned
        return min(same, len(prompt_ids) - 1)

    def pin(self, prefix_ids):
        """Prefill `prefix_ids` now and keep their K/V for every later prompt that starts with
        them (a robot's standing instructions): never evicted.

        Positions are absolute (RoPE, and the static cache indexes K/V by position), so a
        prompt that does not start with the prefix must write its own K/V at positions 0..,
        over the prefix's: it cannot be placed after it. The pinned K/V is therefore copied
        aside once (len(prefix) x kv_bytes_per_token of memory: 46 MB for 1000 tokens of
        SmolLM2 in float32, 57 MB for qwen2.5-7b in bf16) and copied back, one device
        copy, by the next prompt that starts with it: far cheaper than prefilling it again,
        and exact.
        """
        prefix_ids = list(prefix_ids)
        if not prefix_ids:
            self.pinned_ids, self._pinned_kv = [], None
            return
        if len(prefix_ids) >= self.max_context:
            raise ContextOverflow(f'pinned prefix of {len(prefix_ids)} tokens does not fit in '
                                  f'max_context {self.max_context} (with room for a reply)')
        self.cached_ids, self.pinned_ids, self._pinned_kv = [], [], None
        with torch.no_grad():
            ids = _device_ids(prefix_ids, self.device)
            self.backend.prefill(ids, 0)
            self._pinned_kv = self.backend.save_prefix(len(prefix_ids))
        self.pinned_ids, self.cached_ids = prefix_ids, list(prefix_ids)

    def clear_prompt_cache(self):
        """Forget the cached sequence: the next prompt prefills from its start (or from the
        pinned prefix's end, which is kept)."""
        self.cached_ids = []

    def _fall_back(self, reason):
        self.mode = 'eager'
        self.fallback_reason = reason
        self.graph_fallbacks += 1

    def _launch(self, greedy):
        graph = self._graphs.get(greedy)
        if graph is not None:
            graph.replay()
        else:
            self._step(greedy)

    def step(self, greedy=True):
        """Launch one decode step at the current position (graph replay when captured)."""
        with torch.no_grad():
            self._launch(greedy)

    # -- serving ----------------------------------------------------------------------------
    def generate(self, prompt_ids, params=SamplingParams(), max_new_tokens=64,
                 stop_token_ids=(), should_stop=None):
        """Yield a Step per generated token, until max_new_tokens, a stop id or should_stop().

        The prompt's longest prefix shared with the cached sequence, or with the pinned prefix
        (pin()), is not prefilled again (`last_cached_tokens`). The cached sequence only ever
        names K/V that were completely written: it is emptied before the prefill, set to the
        prompt once the prefill returned, and grows by one token per step the caller received,
        so a cancel, an error or an abandoned generator leaves only what was computed.
        """
        if self.batch != 1:
            raise ValueError(f'generate() decodes one sequence; this decoder of batch '
                             f'{self.batch} times steps only (time_steps)')
        n = len(prompt_ids)
        if n == 0:
            raise ValueError('the prompt is empty')
        if n + max_new_tokens > self.max_context:
            raise ContextOverflow(
                f'prompt of {n} tokens + {max_new_tokens} new tokens exceeds max_context '
                f'{self.max_context}')
        self.sampling.load(params)
        greedy = params.greedy
        t0 = time.perf_counter()
        reuse = self._reusable(prompt_ids)
        self.cached_ids, self.last_cached_tokens = [], reuse
        with torch.no_grad():
            ids = _device_ids(prompt_ids[reuse:], self.device)
            logits = self.backend.prefill(ids, reuse)
            self.cached_ids = list(prompt_ids)
            self.pos.fill_(n - 1)
            first = (sample_greedy(logits) if greedy
                     else sample_stochastic(logits, self.sampling, self.pos))
            self.token.copy_(first)
            self.pos.fill_(n)
            token = int(first)
        yield Step(0, token, n - 1, (time.perf_counter() - t0) * 1e3)
        if token in stop_token_ids or max_new_tokens == 1:
            return
        run = self._run_cuda if self._cuda else self._run_cpu
        for step in run(greedy, n, max_new_tokens - 1):
            self.cached_ids.append(token)  # the step's input: its K/V is written now
            token = step.token
            yield step
            if step.token in stop_token_ids or (should_stop is not None and should_stop()):
                return

    def _run_cpu(self, greedy, pos, count):
        with torch.no_grad():
            for index in range(1, count + 1):
                t0 = time.perf_counter()
                self._launch(greedy)
                token = int(self.token)
                yield Step(index, token, pos, (time.perf_counter() - t0) * 1e3)
                pos += 1

    def _run_cuda(self, greedy, pos, count):
        pending = deque()  # (slot, index, pos) launched and not yet read

        def launch(index, step_pos):
            slot = index % 2
            start, end, copied = self._events[slot]
            start.record()
            self._launch(greedy)
            end.record()
            self._host_tokens[slot].copy_(self.token[0, 0], non_blocking=True)
            copied.record()  # the copy runs after `end`: waiting for `end` can read a stale slot
            pending.append((slot, index, step_pos))

        with torch.no_grad():
            launch(1, pos)
            for index in range(1, count + 1):
                if index < count:
                    launch(index + 1, pos + index)  # one step ahead of the host
                slot, i, step_pos = pending.popleft()
                start, end, copied = self._events[slot]
                copied.synchronize()
                token = int(self._host_tokens[slot])
                yield Step(i, token, step_pos, start.elapsed_time(end))

    # -- offline timing ---------------------------------------------------------------------
    def time_steps(self, pos, steps, warmup=5):
        """Time `steps` back-to-back greedy steps starting at position `pos` (ms per step).

        The cache is filled with random values first: the timed steps must not run on zeros.
        """
        if pos + warmup + steps > self.max_context:
            raise ContextOverflow(f'pos {pos} + {warmup + steps} steps exceeds max_context '
                                  f'{self.max_context}')
        with torch.no_grad():
            if hasattr(self.backend, 'randomize_cache'):
                self.backend.randomize_cache()
            self._seek(pos)
            for _ in range(warmup):
                self._launch(True)
            if not self._cuda:
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    self._launch(True)
                    times.append((time.perf_counter() - t0) * 1e3)
                return times
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            events[0].record()
            for i in range(steps):
                self._launch(True)
                events[i + 1].record()
            events[-1].synchronize()
            return [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
