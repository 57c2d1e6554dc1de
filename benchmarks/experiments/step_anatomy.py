"""Where a graphed decode step's time goes, by role (fused backend, one GPU).

For each weight format: build the decoder as the bench does (fused, graph), time greedy steps at
a position (median), then profile a few graph replays and attribute every kernel of a step to a
role by its name and its place in the layer: q/k/v (+RoPE), attention, merge, o_proj, gate/up,
down, lm_head, other. Kernels launched with PDL start before the previous one ends, so a
kernel's share is the time from the previous kernel's end to its own end ("end to end"; the
shares add up to the step's span); its own start-to-end duration is reported beside it.

    python benchmarks/experiments/step_anatomy.py --weights bf16 int8 int4 --out anatomy.json
"""
import argparse
import json
import statistics

import torch

from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.sources import load_model

ROLES = ('qkv', 'attention', 'merge', 'o_proj', 'gate_up', 'down', 'lm_head', 'other')


def roles(names):
    """The role of each kernel of one step, in launch order."""
    out, since_merge = [], None
    for name in names:
        low = name.lower()
        if 'qkv_rope' in low:
            role, since_merge = 'qkv', None
        elif 'attention_split' in low:
            role = 'attention'
        elif 'attention_merge' in low:
            role, since_merge = 'merge', 0
        elif ('gemv' in low or 'staged' in low) and since_merge is not None:
            since_merge += 1
            role = ('o_proj', 'gate_up', 'down', 'lm_head')[min(since_merge, 4) - 1]
        elif 'gemv' in low:
            role = 'lm_head'
        else:
            role = 'other'
        out.append(role)
    return out


def anatomy(decoder, replays=10):
    """Per role: (end-to-end ms, own-duration ms) a step, and the step's span, median over
    `replays` profiled graph replays."""
    from torch.autograd import DeviceType
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            decoder.step()
            torch.cuda.synchronize()
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == DeviceType.CUDA)
    per_step = len(ks) // replays
    steps = [ks[i * per_step:(i + 1) * per_step] for i in range(replays)]
    rows = []
    for step in steps:
        row = {r: [0.0, 0.0] for r in ROLES}
        prev_end = step[0][0]
        for (start, end, _), role in zip(step, roles([k[2] for k in step])):
            row[role][0] += (end - max(prev_end, 0)) / 1e3 if end > prev_end else 0.0
            row[role][1] += (end - start) / 1e3
            prev_end = max(prev_end, end)
        row['span'] = [(step[-1][1] - step[0][0]) / 1e3, 0.0]
        rows.append(row)
    names = sorted({k[2][:80] for k in steps[0]})
    return ({r: [round(statistics.median(x[r][i] for x in rows), 4) for i in (0, 1)]
             for r in ROLES + ('span',)}, per_step, names)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='qwen2.5-7b')
    parser.add_argument('--weights', nargs='+', default=['bf16', 'int8', 'int4'])
    parser.add_argument('--ctx', type=int, default=2048)
    parser.add_argument('--kernel-configs', default=None)
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    loaded = load_model(args.model, device='cuda', dtype=torch.bfloat16)
    results = []
    for weights in args.weights:
        decoder = Decoder(loaded, mode='graph', backend='fused', max_context=args.ctx + 256,
                          weights=weights, kernel_configs=args.kernel_configs)
        ms = statistics.median(decoder.time_steps(args.ctx - 1, 100, warmup=20))
        decoder._seek(args.ctx - 1)
        shares, kernels, names = anatomy(decoder)
        results.append(dict(weights=weights, ms_per_step=round(ms, 4), kernels=kernels,
                            shares=shares, kernel_names=names))
        print(f'{weights}: {ms:.3f} ms/step, {kernels} kernels a step', flush=True)
        for role, (e2e, own) in shares.items():
            print(f'    {role:10s} {e2e:7.3f} ms end to end   {own:7.3f} ms own', flush=True)
        del decoder
        torch.cuda.empty_cache()
    with open(args.out, 'w') as f:
        json.dump(dict(model=args.model, ctx=args.ctx, device=torch.cuda.get_device_name(),
                       torch=torch.__version__, rows=results), f, indent=1)


if __name__ == '__main__':
    main()
