"""The GEMVs' K loop compiled for sm_90 without a GPU: what a weight costs.

For the bf16, int8 and int4 gate/up GEMV of a model (the shipped H200 table's configs),
compiled for Hopper as compile_sm90.py does: the layout conversions inside the loop (TTGIR:
each one a trip through shared memory with barriers) and the loop body's SASS by opcode, per
thread and per weight. A proxy, not a timing: it says where instructions go, not how long
they stall.

    python benchmarks/experiments/gemv_loop_anatomy.py [qwen2.5-7b]
"""
import collections
import os
import re
import subprocess
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_sm90 as C  # noqa: E402

from decode_monitor.engine.fused import gemv, tables  # noqa: E402
from decode_monitor.engine.fused.quant import QuantWeight  # noqa: E402
from decode_monitor.engine.presets import preset_config  # noqa: E402


def loop_converts(ttgir):
    """convert_layout ops inside scf.for bodies: (source type -> target type) strings."""
    out, depth = [], 0
    for line in ttgir.splitlines():
        if 'scf.for' in line:
            depth += 1
        if depth and 'ttg.convert_layout' in line:
            out.append(re.sub(r'\s*loc\(.*', '', line.split('convert_layout', 1)[1]).strip())
        if 'scf.yield' in line and depth:
            depth -= 1
    return out


def loop_opcodes(cubin):
    """Opcode counts of the longest loop (a backward branch's range) of the cubin's SASS, and
    whether there was one (else the whole kernel: a loop unrolled)."""
    tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                        'cuobjdump')
    path = '/tmp/gemv_loop_anatomy.cubin'
    with open(path, 'wb') as f:
        f.write(cubin)
    sass = subprocess.run([tool, '-sass', path], capture_output=True, text=True,
                          check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           re.finditer(r'^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);', sass, re.M)]
    loops = [(int(m.group(1), 16), a) for a, op in ins
             for m in [re.search(r'BRA (0x[0-9a-f]+)', op)] if m and int(m.group(1), 16) < a]
    lo, hi = max(loops, key=lambda r: r[1] - r[0]) if loops else (ins[0][0], ins[-1][0])
    body = [op for a, op in ins if lo <= a <= hi]
    return collections.Counter(re.sub(r'^@!?U?P\w+\s+', '', op).split()[0].split('.')[0]
                               for op in body), bool(loops)


def anatomy(fmt, n, k, table):
    group = 128
    if fmt == 'bf16':
        w = torch.zeros(2 * n, k, dtype=torch.bfloat16)
    else:
        words = torch.zeros(2 * n, k // (8 if fmt == 'int4' else 4), dtype=torch.int32)
        q = words.view(torch.uint8 if fmt == 'int4' else torch.int8)
        scale = torch.zeros(2 * n, k // group, dtype=torch.bfloat16)
        w = QuantWeight(fmt, q, scale, scale.clone() if fmt == 'int4' else None, group)
    x = torch.zeros(k, dtype=torch.bfloat16)
    cfg = table.gemv('gated', n, k, fmt)
    with C.Recorder() as rec:
        gemv.gemv(w, x, torch.zeros(n, dtype=torch.bfloat16), norm_weight=x, gated=True,
                  eps=1e-6, config=cfg, kind='gated')
    fn, args, kwargs = rec.calls[0]
    res = C.compile_call(fn, args, kwargs, keep=True, **C.gpu_settings(kwargs))
    compiled = res.pop('compiled')
    ops, looped = loop_opcodes(compiled.asm['cubin'])
    span = cfg.block_k if looped else k // cfg.split_k  # a loop iteration's K, or the kernel's
    weights = 2 * cfg.block_n * span / (32 * cfg.num_warps)  # a thread's
    return cfg, res, loop_converts(compiled.asm['ttgir']), ops, weights, looped


def main(argv):
    config = preset_config(argv[0] if argv else 'qwen2.5-7b')
    table = tables.load(tables.shipped_table_path('NVIDIA H200'))
    for fmt in ('bf16', 'int8', 'int4'):
        cfg, res, converts, ops, weights, looped = anatomy(fmt, config.intermediate_size,
                                                           config.hidden_size, table)
        total = sum(ops.values())
        print(f'{fmt} gate/up {tuple(cfg)}: {res}')
        print(f"  {'loop' if looped else 'kernel (loop unrolled)'}: {total} instructions a "
              f'thread, {weights:.0f} weights: {total / weights:.2f} a weight')
        print('  ' + ', '.join(f'{op} {c}' for op, c in ops.most_common(16)))
        print(f'  {len(converts)} layout conversions in the loop:')
        for c in converts:
            print('    ' + c[:160])


if __name__ == '__main__':
    main(sys.argv[1:])
