"""Stability of the copy probe over fresh processes (the node's and bench's denominator).

Starts `--processes` fresh Python processes one after another (interleaved across
`--pythonpath` checkouts); each runs the probe once, as
the node does at start-up, and reports the bandwidth, the buffer size and the CUDA memory
reserved before and after (the probe must give its buffers back). `--pythonpath` runs another
checkout's probe (an older version, for a side-by-side). Prints the spread, (max - min) / median
over the processes, and the NVML peak.

    python benchmarks/experiments/copy_probe.py --processes 5 --out copy_probe.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r'''
import json, time, torch
from decode_monitor.engine import floor
torch.cuda.init()
before = torch.cuda.memory_reserved()
free_before = torch.cuda.mem_get_info()[0]
t0 = time.perf_counter()
if hasattr(floor, 'copy_probe'):
    p = floor.copy_probe('cuda')
    row = {'bandwidth': p.bandwidth, 'buffer_bytes': p.buffer_bytes,
           'warmup_copies': p.warmup_copies, 'copy_spread': p.spread,
           'min_bw': 2 * p.buffer_bytes / max(p.times_s),
           'max_bw': 2 * p.buffer_bytes / min(p.times_s)}
else:
    row = {'bandwidth': floor.measure_copy_bandwidth('cuda')}
row['seconds'] = time.perf_counter() - t0
row['reserved_before'] = before
row['reserved_after'] = torch.cuda.memory_reserved()
row['free_before'] = free_before
row['free_after'] = torch.cuda.mem_get_info()[0]
print('@@' + json.dumps(row))
'''


def child(pythonpath):
    root = os.path.abspath(pythonpath)  # also the working directory: `-c` imports from there
    out = subprocess.run([sys.executable, '-c', CHILD], env=dict(os.environ, PYTHONPATH=root),
                         cwd=root, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line[2:] for line in out.splitlines() if line.startswith('@@')))


def run(pythonpaths, processes):
    """Processes of each checkout, interleaved (a, b, a, b, ...)."""
    rows = {p: [] for p in pythonpaths}
    for _ in range(processes):
        for p in pythonpaths:
            rows[p].append(child(p))
    runs = []
    for p, rs in rows.items():
        bws = [r['bandwidth'] for r in rs]
        median = statistics.median(bws)
        runs.append({'pythonpath': p, 'rows': rs, 'median_gbs': median / 1e9,
                     'spread': (max(bws) - min(bws)) / median})
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--processes', type=int, default=5)
    ap.add_argument('--pythonpath', nargs='+', default=['.'])
    ap.add_argument('--out')
    args = ap.parse_args()
    import torch
    from decode_monitor.telemetry.gpu import GpuTelemetry
    gpu = GpuTelemetry()
    record = {'command': 'python ' + ' '.join(sys.argv), 'gpu': gpu.name, 'uuid': gpu.uuid,
              'driver': gpu.driver, 'torch': torch.__version__,
              'peak_bandwidth_gbs': gpu.peak_bandwidth / 1e9 if gpu.peak_bandwidth else None,
              'runs': run(args.pythonpath, args.processes)}
    peak = record['peak_bandwidth_gbs']
    print(f"{gpu.name}, driver {gpu.driver}, torch {torch.__version__}, NVML peak {peak} GB/s")
    for r in record['runs']:
        gbs = ' '.join(f"{x['bandwidth'] / 1e9:.0f}" for x in r['rows'])
        print(f"{r['pythonpath']}: GB/s {gbs} | median {r['median_gbs']:.0f} "
              f"({r['median_gbs'] / peak:.1%} of peak) | spread {r['spread']:.2%}"
              if peak else f"{r['pythonpath']}: {gbs} spread {r['spread']:.2%}")
        for x in r['rows']:
            print('   ', {k: (round(v, 4) if isinstance(v, float) else v) for k, v in x.items()})
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(record, f, indent=1)


if __name__ == '__main__':
    main()
