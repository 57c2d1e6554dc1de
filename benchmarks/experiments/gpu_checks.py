"""Checks that need a GPU, with the outcome printed as JSON.

- graph replay produces the same tokens as eager steps, greedy and seeded sampling (the
  sampler is counter-based, so a seed fixes the tokens in either mode);

- graph capture fails (a backend whose step syncs with the host, which capture forbids):
  the decoder falls back to eager, says why, counts it, and still serves;
- CUDA runs out of memory during a step (the GPU filled by another allocation): the request gets
  an error response and, once memory is back, the next request is served.

    PYTHONPATH=. python3 benchmarks/experiments/gpu_checks.py --out gpu_checks.json
"""
import argparse
import json
import threading
import time

import torch

from decode_monitor.engine.decoder import Decoder, register_backend
from decode_monitor.engine.hf_backend import HFBackend
from decode_monitor.engine.sampling import SamplingParams
from decode_monitor.engine.sources import load_model
from decode_monitor.serving.service import DecodeService


class HostSyncBackend(HFBackend):
    """The hf backend plus a host read of the position each step: legal eagerly, not in a graph."""

    name = 'hf-host-sync'

    def forward_one(self, token, pos):
        if int(pos) < 0:  # a device-to-host copy: capture raises on it
            raise AssertionError('unreachable')
        return super().forward_one(token, pos)


def serve(make_decoder, requests, before_each=None):
    responses = []
    service = DecodeService(make_decoder, lambda *a: None,
                            lambda body: responses.append(json.loads(body)))
    service.start()
    while service.snapshot()['state'] == 'loading':
        time.sleep(0.05)
    for i, request in enumerate(requests):
        if before_each:
            before_each(i)
        service.submit(json.dumps(request))
        deadline = time.monotonic() + 120
        while len(responses) <= i and time.monotonic() < deadline:
            time.sleep(0.01)
    service.stop()
    return service, responses


def graph_matches_eager(loaded):
    """Token agreement eager/eager, graph/graph and eager/graph, and one step's logits graphed
    vs eager on the same cache state. Random weights give near-tied logits, so token agreement
    alone cannot tell a graph bug from run-to-run noise in the GEMV kernels."""
    prompt = list(range(1, 17))
    out = {}
    for name, params in (('greedy', SamplingParams()),
                         ('seeded top-p', SamplingParams(temperature=0.8, top_p=0.9, seed=11))):
        runs = {}
        for label, mode in (('eager', 'eager'), ('eager again', 'eager'), ('graph', 'graph'),
                            ('graph again', 'graph')):
            decoder = Decoder(loaded, mode=mode, backend='hf', max_context=128)
            assert decoder.mode == mode, decoder.fallback_reason
            runs[label] = [s.token for s in decoder.generate(prompt, params, 48)]
            del decoder
        out[name] = {f'{a} vs {b}': sum(x == y for x, y in zip(runs[a], runs[b]))
                     for a, b in (('eager', 'eager again'), ('graph', 'graph again'),
                                  ('eager', 'graph'))} | {'tokens': 48}
    decoder = Decoder(loaded, mode='eager', backend='hf', max_context=128)
    list(decoder.generate(prompt, SamplingParams(), 8))
    backend, token, pos = decoder.backend, decoder.token, decoder.pos
    at = int(pos)
    with torch.no_grad():
        backend.seek(at)
        eager = backend.forward_one(token, pos).float()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            backend.seek(at)
            backend.forward_one(token, pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        backend.seek(at)
        with torch.cuda.graph(graph):
            static_logits = backend.forward_one(token, pos)
        backend.seek(at)
        graph.replay()
        torch.cuda.synchronize()
        backend.seek(at)
        again = backend.forward_one(token, pos).float()
    out['one step logits'] = dict(
        graph_vs_eager_rel_err=float((static_logits.float() - eager).norm() / eager.norm()),
        eager_vs_eager_rel_err=float((again - eager).norm() / eager.norm()),
        top1_equal=bool(static_logits.argmax() == eager.argmax()))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='llama-3-8b')
    parser.add_argument('--out', default='gpu_checks.json')
    args = parser.parse_args()
    loaded = load_model(args.model, device='cuda', dtype=torch.bfloat16)
    register_backend('hf-host-sync', HostSyncBackend)
    result = {'graph vs eager': graph_matches_eager(loaded)}

    ballast = []

    def fill_gpu_then_release(i):
        if i == 0:
            return  # a first request warms the worker thread's cuBLAS handle, as in service
        if i == 1:  # leave almost nothing free for the next request
            free, _ = torch.cuda.mem_get_info()
            while free > 64 << 20:
                try:
                    ballast.append(torch.empty(max(free - (48 << 20), 1 << 20), dtype=torch.uint8,
                                               device='cuda'))
                except torch.OutOfMemoryError:
                    break
                free, _ = torch.cuda.mem_get_info()
        else:
            ballast.clear()
            torch.cuda.empty_cache()
    service, responses = serve(
        lambda: Decoder(loaded, mode='eager', backend='hf', max_context=4096),
        [{'id': 'warm', 'prompt': 'hello', 'max_new_tokens': 8},
         {'id': 'squeezed', 'prompt': 'x' * 3000, 'max_new_tokens': 8},
         {'id': 'after', 'prompt': 'hello', 'max_new_tokens': 8}],
        before_each=fill_gpu_then_release)
    result['out of memory'] = dict(responses=responses,
                                   counters=vars(service.snapshot()['counters']))
    decoder = Decoder(loaded, mode='graph', backend='hf-host-sync', max_context=256)
    tokens = [s.token for s in decoder.generate(list(range(1, 9)), max_new_tokens=16)]
    result['capture failure'] = dict(mode_requested=decoder.mode_requested, mode=decoder.mode,
                                     graph_fallbacks=decoder.graph_fallbacks,
                                     reason=decoder.fallback_reason, tokens_served=len(tokens))
    del decoder
    torch.cuda.empty_cache()

    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(
        float((torch.randn(64, 64, device='cuda') @ torch.randn(64, 64, device='cuda')).sum())))
    worker.start()
    worker.join()
    result['capture failure']['new thread matmul after it'] = 'ok' if outcome else 'failed'
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1)[:4000])


if __name__ == '__main__':
    main()
