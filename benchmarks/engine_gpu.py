"""The engine on a GPU, no ROS: ms/step and % of the memory floor, eager vs graph, plus two checks.

- event timings against wall-clock over the pipelined serving loop (generate);
- one diagnostics snapshot, the same key/values the node publishes, from a real DecodeService.

    python benchmarks/engine_gpu.py --model qwen2.5-7b --contexts 2048 16384 --out results.json
"""
import argparse
import json
import platform
import statistics
import time

import torch
import transformers

from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.floor import measure_copy_bandwidth
from decode_monitor.engine.sampling import SamplingParams
from decode_monitor.engine.sources import load_model
from decode_monitor.serving.service import DecodeService
from decode_monitor.telemetry.gpu import GpuTelemetry
from decode_monitor.telemetry.health import Thresholds
from decode_monitor.telemetry.report import statuses


def environment(gpu):
    return dict(gpu=gpu.name, gpu_uuid=gpu.uuid, driver=gpu.driver, torch=torch.__version__,
                cuda=torch.version.cuda, transformers=transformers.__version__,
                python=platform.python_version())


def time_cells(loaded, contexts, modes, backend, steps, warmup, peak, measured):
    rows = []
    for ctx in contexts:
        for mode in modes:
            decoder = Decoder(loaded, mode=mode, backend=backend,
                              max_context=ctx + warmup + steps + 8)
            times = decoder.time_steps(pos=ctx, steps=steps, warmup=warmup)
            ms = statistics.median(times)
            mid = ctx + warmup + steps // 2
            floor_peak = decoder.floor.floor_ms(mid, peak)
            rows.append(dict(model=loaded.name, ctx=ctx, backend=backend, mode=decoder.mode,
                             mode_requested=mode, fallback=decoder.fallback_reason,
                             ms_per_step=ms, p95_ms=sorted(times)[int(0.95 * len(times))],
                             floor_ms=floor_peak, floor_fraction=floor_peak / ms,
                             floor_fraction_measured=decoder.floor.floor_ms(mid, measured) / ms,
                             bytes_per_step=decoder.floor.bytes_per_step(mid), steps=steps))
            del decoder
            torch.cuda.empty_cache()
    return rows


def wall_clock_check(loaded, backend, tokens=256):
    """Sum of per-step event times vs the host's wall-clock over the same pipelined steps."""
    decoder = Decoder(loaded, mode='graph', backend=backend, max_context=tokens + 64)
    prompt = list(range(1, 33))
    list(decoder.generate(prompt, SamplingParams(), max_new_tokens=16))  # warm
    torch.cuda.synchronize()
    gen = decoder.generate(prompt, SamplingParams(), max_new_tokens=tokens)
    next(gen)  # the prefill token; the clock starts with the decode steps
    t0 = time.perf_counter()
    events = [step.step_ms for step in gen]
    wall = (time.perf_counter() - t0) * 1e3
    return dict(steps=len(events), event_sum_ms=sum(events), wall_ms=wall,
                event_over_wall=sum(events) / wall, mode=decoder.mode)


def diagnostics_snapshot(loaded, backend, gpu, peak, measured):
    responses = []
    service = DecodeService(
        lambda: Decoder(loaded, mode='graph', backend=backend, max_context=512),
        lambda *a: None, responses.append)
    service.start()
    service.submit(json.dumps({'id': 'gpu', 'prompt': 'hello', 'max_new_tokens': 128}))
    while not responses:
        time.sleep(0.05)
    decoder = service.decoder
    info = dict(model=loaded.name, dtype='bfloat16', backend=backend, mode=decoder.mode,
                mode_requested='graph', graph_fallbacks=decoder.graph_fallbacks,
                fallback_reason=decoder.fallback_reason, queue_size=service.queue_size,
                peak_bandwidth=peak, peak_source='NVML', measured_bandwidth=measured)
    report = statuses(service.snapshot(), service.window.stats(peak, measured), info, gpu,
                      gpu.sample(), Thresholds())
    service.stop()
    return dict(response=json.loads(responses[0]), statuses=[
        dict(name=n, level=lv, message=m, hardware_id=h, values=dict(v))
        for n, lv, m, h, v in report])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='qwen2.5-7b')
    parser.add_argument('--contexts', type=int, nargs='+', default=[2048, 16384])
    parser.add_argument('--modes', nargs='+', default=['eager', 'graph'])
    parser.add_argument('--backend', default='hf')
    parser.add_argument('--steps', type=int, default=100)
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--out', default='engine_gpu.json')
    args = parser.parse_args()
    gpu = GpuTelemetry()
    measured = measure_copy_bandwidth('cuda')
    peak = gpu.peak_bandwidth or measured
    t0 = time.perf_counter()
    loaded = load_model(args.model, device='cuda', dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    rows = time_cells(loaded, args.contexts, args.modes, args.backend, args.steps, args.warmup,
                      peak, measured)
    result = dict(environment=environment(gpu), peak_bandwidth=peak, measured_bandwidth=measured,
                  model_build_s=load_s, cells=rows,
                  wall_clock=wall_clock_check(loaded, args.backend),
                  diagnostics=diagnostics_snapshot(loaded, args.backend, gpu, peak, measured))
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result['diagnostics'], indent=1))
    print(json.dumps(result['wall_clock']))
    print(f'{result["environment"]}\npeak {peak / 1e9:.0f} GB/s, copy {measured / 1e9:.0f} GB/s')
    print(f'{"model":22} {"ctx":>6} {"mode":6} {"ms/step":>8} {"floor ms":>8} {"% floor":>8}'
          f' {"% copy":>7}')
    for r in rows:
        print(f'{r["model"]:22} {r["ctx"]:6} {r["mode"]:6} {r["ms_per_step"]:8.3f} '
              f'{r["floor_ms"]:8.3f} {100 * r["floor_fraction"]:7.1f}% '
              f'{100 * r["floor_fraction_measured"]:6.1f}%')


if __name__ == '__main__':
    main()
