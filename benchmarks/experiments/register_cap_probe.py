"""Do the quantised GEMVs gain from a register cap (more programs per SM)?

Nsight Compute put the int8 and int4 gate/up GEMVs of qwen2.5-7b on the H200 at 167-168
registers a thread, 3 programs (12 warps) an SM, issue slots idle 40-50 % of the time, and
memory waits first (results/h200/tune_quant/ncu/). This builds the fused decoder for each
quantised format with the shipped table, then caps the registers (GemvConfig.max_registers, the
launch's maxnreg) of every quantised GEMV of the step, or of gate/up only, and times the graphed
step as `bench tune` does (candidates in alternating turns, median of rounds). The logits of each
capped step are checked against the uncapped step's, bit for bit: a register cap changes where
values live, not the arithmetic.

    python benchmarks/experiments/register_cap_probe.py out.json [model] [context] [device]

(device `cpu`: a dry run under Triton's interpreter with the H200's table, where caps change
nothing: for checking the script, not for numbers.)
"""
import json
import sys

import torch

from decode_monitor.bench.tune import Timer
from decode_monitor.engine.fused import tables
from decode_monitor.engine.fused.model import FusedBackend
from decode_monitor.engine.sources import load_model

CAPS = (None, 128, 96, 80)


def capped(table, backend, cap, kinds):
    for key in dict.fromkeys(backend.gemv_keys().values()):
        if key.weights != 'bf16' and key.kind in kinds:
            config = table.gemv(key.kind, key.n, key.k, key.weights)
            table = table.with_gemv(key, config._replace(max_registers=cap))
    return table


def main(argv):
    out_path = argv[0]
    model = argv[1] if len(argv) > 1 else 'qwen2.5-7b'
    context = int(argv[2]) if len(argv) > 2 else 2048
    device = argv[3] if len(argv) > 3 else 'cuda'
    gpu = torch.cuda.get_device_name() if device == 'cuda' else 'NVIDIA H200'
    shipped = tables.load(tables.shipped_table_path(gpu))
    loaded = load_model(model, device=device,
                        dtype=torch.bfloat16 if device == 'cuda' else torch.float32)
    rows = []
    best_table = shipped
    for fmt in ('int8', 'int4'):
        backend = FusedBackend(loaded.model, context, use_triton=True, weights=fmt,
                               kernel_configs=shipped)
        backend.randomize_cache()
        timer = Timer(backend, torch)
        variants = [('all', cap, ('qkv', 'gemv', 'gated', 'head')) for cap in CAPS] + [
            ('gated', cap, ('gated',)) for cap in CAPS[1:]]
        runs, names, reference = [], [], None
        for scope, cap, kinds in variants:
            backend.set_kernel_configs(capped(shipped, backend, cap, kinds))
            try:
                logits = backend.forward_one(timer.token, timer.pos).clone()
                run = timer.prepare()
            except Exception as exc:  # a cap ptxas cannot meet: recorded, not timed
                rows.append({'weights': fmt, 'scope': scope, 'cap': cap,
                             'error': f'{type(exc).__name__}: {str(exc)[:200]}'})
                continue
            same = reference is None or torch.equal(logits, reference)
            reference = logits if reference is None else reference
            runs.append(run)
            names.append((scope, cap, same))
        times = timer.median_ms(runs, rounds=8)
        for (scope, cap, same), ms in zip(names, times):
            rows.append({'weights': fmt, 'scope': scope, 'cap': cap, 'ms_per_step': ms,
                         'logits_equal_uncapped': same})
            print(f'{fmt} {scope:5s} cap={cap} {ms:.4f} ms/step  logits equal: {same}',
                  flush=True)
        (scope, cap, same), ms = min(zip(names, times), key=lambda t: t[1])
        if cap is not None and same:  # the fastest, where it is not the uncapped step
            kinds = dict((v[0], v[2]) for v in variants)[scope]
            best_table = capped(best_table, backend, cap, kinds)
        del backend, timer, runs
        if device == 'cuda':
            torch.cuda.empty_cache()
    with open(out_path, 'w') as f:
        json.dump({'gpu': gpu, 'torch': torch.__version__,
                   'model': model, 'context': context, 'rows': rows}, f, indent=1)
    # the shipped table with each format's fastest cap, for an end-to-end bench beside it
    tables.save(out_path.replace('.json', '_table.json'),
                tables.to_dict(best_table, {**shipped.provenance,
                                            'command': 'register_cap_probe.py ' + ' '.join(argv)}))


if __name__ == '__main__':
    main(sys.argv[1:])
