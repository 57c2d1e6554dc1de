"""Co-location on one GPU: what another process costs a decode step, and what telemetry sees.

    python benchmarks/shared_gpu.py --model qwen2.5-7b --ctx 2048 --steps 1000 --out DIR

One decoding process (fused backend, graph mode, event-timed steps from Decoder.time_steps)
and, one phase at a time, a co-runner process (decode_monitor.bench.corunner, as `bench
--co-runners` starts them), timed in phases, each `steps` steps at position `ctx`:

  alone        no other process
  idle         a co-runner holds a CUDA context and 2 GiB, runs nothing
  copy         the device-copy loop runs
  matmul       the bf16 matmul loop runs

`bench --co-runners none copy matmul` measures the step time beside each co-runner over fresh
sessions; this script shows what the telemetry and diagnostics see meanwhile.

In the copy and matmul phases the GPU telemetry lists the other processes (GpuTelemetry
.processes(): pid, name, memory, SM share), next to nvidia-smi's listing as a cross-check,
and the diagnostics this package would publish are built from the phase's steps
(LiveTelemetry + report.statuses). Each phase's J/token comes from NVML's energy counter.
Results go to DIR/shared_gpu.json after every phase, so a run cut short keeps what it did.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from decode_monitor.bench.corunner import CoRunner
import decode_monitor.engine.factory  # noqa: F401  (registers the fused backend)
from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.sources import load_model
from decode_monitor.serving.service import Counters
from decode_monitor.telemetry.device import DeviceIdentity, hardware_id
from decode_monitor.telemetry.gpu import GpuTelemetry
from decode_monitor.telemetry.health import Thresholds
from decode_monitor.telemetry.live import LiveTelemetry
from decode_monitor.telemetry.report import statuses
from decode_monitor.telemetry.window import StepWindow


def summary(times):
    s = sorted(times)
    return dict(n=len(s), median_ms=statistics.median(s), p95_ms=s[int(0.95 * len(s))],
                p99_ms=s[int(0.99 * len(s))], min_ms=s[0], max_ms=s[-1],
                mean_ms=statistics.fmean(s))


def nvidia_smi_apps():
    try:
        return subprocess.run(
            ['nvidia-smi', '--query-compute-apps=pid,process_name,used_memory',
             '--format=csv'], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f'nvidia-smi failed: {exc}'


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--model', default='qwen2.5-7b')
    ap.add_argument('--ctx', type=int, default=2048)
    ap.add_argument('--steps', type=int, default=1000)
    ap.add_argument('--warmup', type=int, default=50)
    ap.add_argument('--out', required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, 'shared_gpu.json')
    t_start = time.perf_counter()
    gpu = GpuTelemetry()
    nv = gpu._nvml
    props = torch.cuda.get_device_properties(0)
    device = DeviceIdentity.from_torch(torch.device('cuda', 0), props)
    record = dict(
        command=' '.join(['python'] + sys.argv), pid=os.getpid(),
        env=dict(gpu=gpu.name, gpu_uuid=gpu.uuid, driver=gpu.driver, torch=torch.__version__,
                 cuda=torch.version.cuda, python=platform.python_version(),
                 platform=platform.platform()),
        nvml=dict(max_mem_clock_mhz=nv.nvmlDeviceGetMaxClockInfo(gpu._handle,
                                                                 nv.NVML_CLOCK_MEM),
                  bus_width_bits=nv.nvmlDeviceGetMemoryBusWidth(gpu._handle),
                  peak_bandwidth=gpu.peak_bandwidth),
        torch_device=dict(name=props.name, uuid=str(getattr(props, 'uuid', None)),
                          identity_label=device.label,
                          hardware_id_with_nvml=hardware_id(gpu, device),
                          hardware_id_without_nvml=hardware_id(GpuTelemetry(nvml=_NoNvml()),
                                                               device)),
        phases={})

    def save():
        record['wall_s'] = time.perf_counter() - t_start
        with open(out_path, 'w') as f:
            json.dump(record, f, indent=1)

    save()
    t0 = time.perf_counter()
    loaded = load_model(args.model, device='cuda', dtype=torch.bfloat16)
    decoder = Decoder(loaded, mode='graph', backend='fused',
                      max_context=args.ctx + args.warmup + args.steps + 8)
    record['decoder'] = dict(model=loaded.name, mode=decoder.mode, backend='fused',
                             fallback=decoder.fallback_reason, ctx=args.ctx,
                             bytes_per_step=decoder.floor.bytes_per_step(
                                 args.ctx + args.warmup + args.steps // 2),
                             build_s=time.perf_counter() - t0)
    live = LiveTelemetry(gpu, min_steps=1, energy_window_s=1.0)
    steps_total = [0]

    def phase(name):
        window = StepWindow(size=args.steps)
        live.read(None, steps_total[0])  # energy reference; primes the process samples
        listing_before = gpu.processes()
        e0 = gpu.sample().energy_j
        times = decoder.time_steps(pos=args.ctx, steps=args.steps, warmup=args.warmup)
        e1 = gpu.sample().energy_j
        smi = nvidia_smi_apps()
        pos = args.ctx + args.warmup
        for i, ms in enumerate(times):
            window.add(ms, pos + i, decoder.floor.bytes_per_step(pos + i))
        steps_total[0] += args.warmup + args.steps
        stats = window.stats(gpu.peak_bandwidth)
        reading = live.read(stats, steps_total[0])
        snapshot = dict(state='ready', load_error=None, queue_depth=0, active=True,
                        counters=Counters(), ttft_p50_ms=None)
        info = dict(model=loaded.name, backend='fused', mode=decoder.mode, queue_size=8,
                    peak_bandwidth=gpu.peak_bandwidth, peak_source='NVML')
        report = statuses(snapshot, stats, info, gpu, reading.sample, Thresholds(),
                          device=device, live=reading)
        record['phases'][name] = dict(
            steps=summary(times),
            joules_per_token_counter=(None if e0 is None else
                                      (e1 - e0) / (args.warmup + args.steps)),
            joules_per_token_live=reading.joules_per_token,
            listing_before=[vars(p) for p in listing_before],
            listing_after=[vars(p) for p in reading.processes],
            nvidia_smi=smi,
            sharing=vars(reading.sharing),
            statuses=[dict(name=n, level=lv, message=m, hardware_id=h, values=dict(v))
                      for n, lv, m, h, v in report[:2]])
        save()
        s = record['phases'][name]['steps']
        print(f'{name:7s} median {s["median_ms"]:.3f} ms  p95 {s["p95_ms"]:.3f}  '
              f'others {len(reading.processes)}  decode: {report[0][2]!r}', flush=True)

    phase('alone')
    for kind in ('idle', 'copy', 'matmul'):
        with CoRunner(kind, 'cuda') as runner:
            time.sleep(0.5)
            phase(kind)
        record['phases'][kind]['corunner'] = runner.report()
        save()
    alone = record['phases']['alone']['steps']['median_ms']
    for name, p in record['phases'].items():
        p['slowdown_vs_alone'] = p['steps']['median_ms'] / alone
    save()
    print(json.dumps({k: round(v['slowdown_vs_alone'], 3) for k, v in record['phases'].items()}))


class _NoNvml:
    """Stands in for a machine without the NVML library."""

    def nvmlInit(self):
        raise OSError('libnvidia-ml.so.1: cannot open shared object file')


if __name__ == '__main__':
    main()
