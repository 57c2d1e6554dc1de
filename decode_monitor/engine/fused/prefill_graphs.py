"""Captured prefills: a short prompt's prefill replayed as one CUDA graph.

A prefill of a few hundred tokens does little work per kernel and launches some twenty kernels a
layer from Python: the host, not the GPU, sets its pace. So prompts up to the largest bucket are
padded to a bucket length and run as one captured graph:
- fresh prompts (from position 0): FRESH buckets, SDPA's causal mask (the padding comes after
  every real token, so no real token sees it);
- new tokens after a cached prefix: AFTER_PREFIX buckets, the start a device tensor, the keys
  a multiple of KEYS_STEP (or the whole cache) masked by position: attention's cost follows
  the prompt, not max_context (one graph per pair of buckets).
Padded tokens write K/V past the prompt, at positions no query reads before a later step writes
them again; the logits are the last real token's (a device index). Longer prompts, and a bucket
that would run past max_context, take the eager path.
"""
import torch

FRESH = (16, 32, 64, 128, 256, 512)
AFTER_PREFIX = (16, 32, 64, 128)
KEYS_STEP = 1024


class PrefillGraphs:
    def __init__(self, backend):
        self.backend = backend
        self.max_context = backend.max_context
        self.keys = [k for k in range(KEYS_STEP, self.max_context, KEYS_STEP)] + [
            self.max_context]
        self.graphs = {}  # (bucket, keys or None) -> (graph, ids, start, last, logits)
        self._pool = None

    def capture(self):
        """Capture every bucket that fits (largest first, one memory pool)."""
        cases = [(t, None) for t in FRESH if t <= self.max_context] + [
            (t, k) for t in AFTER_PREFIX for k in self.keys if t < k]
        for bucket, keys in sorted(cases, key=lambda c: (-(c[1] or 0), -c[0])):
            self.graphs[(bucket, keys)] = self._capture(bucket, keys)

    def _capture(self, bucket, keys):
        device = self.backend.device
        ids = torch.zeros((1, bucket), dtype=torch.long, device=device)
        start = torch.zeros(1, dtype=torch.long, device=device)
        last = torch.full((1,), bucket - 1, dtype=torch.long, device=device)

        def body():
            if keys:
                return self.backend._torch_forward(ids, start, last=last, keys=keys)
            return self.backend._torch_forward(ids, 0, last=last)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()  # warm-up off the capture stream, as graphs require
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = body()
        self._pool = graph.pool()
        return graph, ids, start, last, logits

    def __call__(self, ids, start_pos):
        """Logits of the last of ids (1, n) written at start_pos.., or None when no captured
        bucket serves this prefill."""
        n = ids.shape[1]
        keys = None
        if start_pos > 0:
            keys = next((k for k in self.keys if k >= start_pos + n), None)
        buckets = AFTER_PREFIX if start_pos > 0 else FRESH
        bucket = next((t for t in buckets if t >= n and (t, keys) in self.graphs), None)
        if bucket is None or start_pos + bucket > self.max_context:
            return None
        graph, static_ids, start, last, logits = self.graphs[(bucket, keys)]
        static_ids[:, :n].copy_(ids)
        static_ids[:, n:].zero_()
        start.fill_(start_pos)
        last.fill_(n - 1)
        graph.replay()
        return logits
