"""Backend `persistent` against `fused` on one model: correctness, repeatability, graphed time.

Builds a preset (random weights of the real shapes) on the GPU, fills the K/V cache with random
values up to ctx - 1, and for `fused` (its tuned table and the defaults) and each persistent
config variant: the logits of one step at position ctx - 1 against the fused step with the
default configs (the same tiles and attention: the relative error should be ~0; fused itself
is checked against fp32 in the GPU tests); q, att, act and the logits poisoned with NaN first;
20 graph replays bit for bit; the wait-timeout flag; then the median of graph replays.

    python benchmarks/experiments/persistent_probe.py --model qwen2.5-7b --ctx 2048 --out DIR
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
from decode_monitor.engine.fused.model import FusedBackend  # noqa: E402
from decode_monitor.engine.fused.persistent_launch import PersistentConfig  # noqa: E402
from decode_monitor.engine.fused.persistent_model import PersistentBackend  # noqa: E402
from decode_monitor.engine.presets import build_preset  # noqa: E402

# the first version's config, every field that the defaults changed pinned; each variant
# changes some of it (a record's JSON holds each cell's whole config)
V1 = PersistentConfig(block_n=8, block_k=256, num_stages=2, layout='one', ticket_blocks=1,
                      ahead=False, tail=1.0, gemv_maxnreg=None, programs_per_sm=None)
C = V1._replace
VARIANTS = {  # name -> PersistentConfig; layout-rows x BLOCK_K-stages[-tickets][-ahead]
    # the first version (one launch a layer; its matrices' loops were not software-pipelined)
    'one-8x256-s1': C(num_stages=1),
    'one-8x256-s2': C(num_stages=2),
    'one-4x512-s4': C(block_n=4, block_k=512, num_stages=4),
    # attention out of the matrices' launch: two launches a layer, or the attention kernels
    'two-8x256-s2': C(layout='two'),
    'two-8x256-s3': C(layout='two', num_stages=3),
    'two-4x256-s4': C(layout='two', block_n=4, num_stages=4),
    'two-4x512-s3': C(layout='two', block_n=4, block_k=512, num_stages=3),
    'two-4x512-s4': C(layout='two', block_n=4, block_k=512, num_stages=4),
    'two-4x512-s5': C(layout='two', block_n=4, block_k=512, num_stages=5),
    'two-8x512-s3-w8': C(layout='two', block_k=512, num_stages=3, num_warps=8),
    'split-4x512-s4': C(layout='split', block_n=4, block_k=512, num_stages=4),
    # tickets of several row blocks, single ones at the tail; the next ticket taken ahead
    'two-4x512-s4-t4': C(layout='two', block_n=4, block_k=512, num_stages=4, ticket_blocks=4),
    'two-4x512-s4-t8': C(layout='two', block_n=4, block_k=512, num_stages=4, ticket_blocks=8),
    'two-4x512-s4-a': C(layout='two', block_n=4, block_k=512, num_stages=4, ahead=True),
    'two-4x512-s4-t4-a': C(layout='two', block_n=4, block_k=512, num_stages=4,
                           ticket_blocks=4, ahead=True),
    'two-4x512-s4-t4-tail.5': C(layout='two', block_n=4, block_k=512, num_stages=4,
                                ticket_blocks=4, tail=0.5),
    'split-4x512-s4-t4-a': C(layout='split', block_n=4, block_k=512, num_stages=4,
                             ticket_blocks=4, ahead=True),
    'two-4x256-s4-t4-a': C(layout='two', block_n=4, num_stages=4, ticket_blocks=4, ahead=True),
    # taking the ticket ahead costs registers (114 at 4 x 512 against 80): capped
    'two-4x512-s4-a-r80': C(layout='two', block_n=4, block_k=512, num_stages=4, ahead=True,
                            gemv_maxnreg=80),
    'two-4x512-s4-t4-a-r80': C(layout='two', block_n=4, block_k=512, num_stages=4,
                               ticket_blocks=4, ahead=True, gemv_maxnreg=80),
    'split-4x512-s4-t4-a-r80': C(layout='split', block_n=4, block_k=512, num_stages=4,
                                 ticket_blocks=4, ahead=True, gemv_maxnreg=80),
    # round 2, around the best of round 1 (split, 4 x 512, 4 stages, ranges of 4, ahead)
    'split-4x512-s4-t4-p4': C(layout='split', block_n=4, block_k=512, num_stages=4,
                              ticket_blocks=4, programs_per_sm=4, ahead=False),
    'split-4x512-s4-t4-a-p3': C(layout='split', block_n=4, block_k=512, num_stages=4,
                                ticket_blocks=4, ahead=True, programs_per_sm=3),
    'split-4x512-s6-t4-a': C(layout='split', block_n=4, block_k=512, num_stages=6,
                             ticket_blocks=4, ahead=True),
    'split-4x512-s4-t8-a': C(layout='split', block_n=4, block_k=512, num_stages=4,
                             ticket_blocks=8, ahead=True),
    'split-8x256-s3-t4-a': C(layout='split', num_stages=3, ticket_blocks=4, ahead=True),
    'split-4x512-s4-t4-a-tail.25': C(layout='split', block_n=4, block_k=512, num_stages=4,
                                     ticket_blocks=4, ahead=True, tail=0.25),
}
D = PersistentConfig()._replace  # the shipped default, for quantised weights' chunks
VARIANTS.update({  # more weights a chunk for int8 / int4 codes: rows x BLOCK_K
    'q-default': D(),
    'q-8x512': D(block_n=8), 'q-16x512': D(block_n=16), 'q-32x512': D(block_n=32),
    'q-4x1024': D(block_k=1024), 'q-8x1024': D(block_n=8, block_k=1024),
    'q-16x1024': D(block_n=16, block_k=1024), 'q-4x2048': D(block_k=2048),
    'q-8x2048': D(block_n=8, block_k=2048), 'q-16x512-t1': D(block_n=16, ticket_blocks=1),
    'q-16x512-s2': D(block_n=16, num_stages=2),
})
VARIANTS.update({  # round 3: what the waits between matrices cost, and the tail
    # no wait gives up polling at once (spin 0): tasks run without their dependencies (wrong
    # logits, every wait counted as a timeout); the time is the step's without any drain
    'nowait': D(spin=0), 'tail2': D(tail=2.0), 't1-a': D(ticket_blocks=1),
    'q-16x512-nowait': D(block_n=16, spin=0),
})


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def graph_of(backend, token, pos):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            backend.forward_one(token, pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward_one(token, pos)
    return graph, out


def time_graph(graph, replays=100, rounds=5):
    """Median ms of one replay over `rounds` timed batches of `replays`."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(10):
        graph.replay()
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[len(times) // 2], times


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--model', default='qwen2.5-7b')
    p.add_argument('--ctx', type=int, default=2048)
    p.add_argument('--variants', nargs='+', default=list(VARIANTS))
    p.add_argument('--no-tuned', action='store_true', help='skip fused with its tuned table')
    p.add_argument('--weights', default='bf16', help='bf16, int8 or int4')
    p.add_argument('--out', default='.')
    p.add_argument('--peak-gbs', type=float, default=None,
                   help='NVML peak bandwidth in GB/s, for a %% of floor column')
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    model = build_preset(args.model, device='cuda')
    token = torch.tensor([[1234]], device='cuda')
    pos = torch.tensor([args.ctx - 1], device='cuda')
    reference = FusedBackend(model, args.ctx, kernel_configs='defaults',
                             weights=args.weights)
    reference.randomize_cache()
    k_cache, v_cache = reference.k_cache, reference.v_cache
    ref_logits = reference.forward_one(token, pos).clone()
    torch.cuda.synchronize()
    step_bytes = reference.floor_model().bytes_per_step(args.ctx - 1)
    rows = {'model': args.model, 'ctx': args.ctx, 'weights': args.weights,
            'gpu': torch.cuda.get_device_name(), 'step_bytes': step_bytes,
            'build_s': round(time.time() - t0, 1), 'cells': []}
    props = torch.cuda.get_device_properties(0)
    rows['props'] = {k: getattr(props, k, None) for k in (
        'multi_processor_count', 'regs_per_multiprocessor', 'max_threads_per_multi_processor',
        'shared_memory_per_multiprocessor', 'L2_cache_size')}
    print(rows['props'])
    print(f'built in {rows["build_s"]} s; bytes a step {step_bytes / 1e9:.3f} GB', flush=True)
    backends = {'fused-defaults': lambda: reference}
    if not args.no_tuned:
        backends['fused-tuned'] = lambda: FusedBackend(model, args.ctx, weights=args.weights)
    for name in args.variants:
        backends[name] = lambda cfg=VARIANTS[name]: PersistentBackend(
            model, args.ctx, weights=args.weights, persistent_config=cfg)
    for name, make in backends.items():
        t1 = time.time()
        cell = {'backend': name}
        try:
            b = make()
            if b is not reference:
                b.k_cache.copy_(k_cache)
                b.v_cache.copy_(v_cache)
            kernel = getattr(b, 'layers_kernel', None)
            if kernel is not None:
                cell.update(grid=[p.grid[0] for p in kernel.parts],
                            per_sm=[p.per_sm for p in kernel.parts],
                            n_regs=[p.n_regs for p in kernel.parts],
                            shared=[p.shared for p in kernel.parts],
                            tasks_per_layer=kernel.tasks, config=list(kernel.config))
            cell['fallbacks'] = getattr(b, 'fallbacks', 0)
            for buf in (b.q, b.att, b.act, b.logits):  # every element must be written
                buf.fill_(float('nan'))
            logits = b.forward_one(token, pos).clone()
            torch.cuda.synchronize()
            cell['rel_vs_fused_defaults'] = rel(logits, ref_logits)
            cell['finite'] = bool(torch.isfinite(logits).all())
            graph, out = graph_of(b, token, pos)
            first = None
            same = True
            for _ in range(20):
                graph.replay()
                if first is None:
                    first = out.clone()
                same &= bool(torch.equal(out, first))
            cell['replays_bitwise_equal'] = same
            cell['graph_vs_eager_bitwise'] = bool(torch.equal(first, logits))
            cell['timeouts'] = b.timeouts() if hasattr(b, 'timeouts') else 0
            ms, times = time_graph(graph)
            cell.update(ms=ms, times=times, gbps=step_bytes / ms / 1e6)
            del graph
        except Exception as exc:  # noqa: BLE001  a probe records what broke and goes on
            cell['error'] = f'{type(exc).__name__}: {exc}'[:2000]
        cell['wall_s'] = round(time.time() - t1, 1)
        rows['cells'].append(cell)
        print(json.dumps({k: v for k, v in cell.items() if k != 'times'}), flush=True)
        path = os.path.join(args.out, f'persistent_probe_{args.model}_{args.weights}.json')
        with open(path, 'w') as f:
            json.dump(rows, f, indent=1)
    floor = step_bytes / (args.peak_gbs * 1e6) if args.peak_gbs else None
    print(f'\n{"backend":24} {"ms":>7} {"GB/s":>6} {"floor%":>6} {"rel":>9} {"bits":>5} '
          'per_sm regs tickets')
    for c in rows['cells']:
        if 'ms' in c:
            pct = f'{100 * floor / c["ms"]:6.1f}' if floor else '     -'
            print(f'{c["backend"]:24} {c["ms"]:7.3f} {c["gbps"]:6.0f} {pct} '
                  f'{c["rel_vs_fused_defaults"]:9.2e} {str(c["replays_bitwise_equal"]):>5} '
                  f'{c.get("per_sm", "")} {c.get("n_regs", "")} {c.get("tasks_per_layer", "")}')
        else:
            print(f'{c["backend"]:24} {c.get("error", "")[:150]}')


if __name__ == '__main__':
    main()
