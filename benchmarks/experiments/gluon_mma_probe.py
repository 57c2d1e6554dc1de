"""int8 GEMV on tensor cores with the codes loaded straight into the MMA's operand registers.

`mma_gemv_probe.py` multiplied int8 codes on the tensor cores through Triton's `tl.dot` and was
2-8x slower than the shipped GEMV: Triton moves a register tile into the dot's operand layout
through shared memory. Here the kernel is written in Gluon with the layouts given: each chunk of
a row block's codes (BLOCK_N rows x one quantisation group of 128) is loaded in the
`DotOperandLayout` of an `mma.sync` m16n8k16 (fp16 in, fp32 out), so a thread's loads are
already its fragments (with k_width 8, 16-byte loads of 16 consecutive codes, no shared
memory); the codes become fp16 in registers (exact: |q| <= 127); x, as fp16, is column 0 of
the (128, 8) right operand (columns 1-7 zeros, the MMA's smallest N); each group's 8 MMAs start
from zero and the group's result is scaled by the rows' group scales. AHEAD chunks of codes are
requested before the current one is multiplied. x in fp16 overflows past 65504 and loses
precision under 6e-5: a probe of the streaming rate, not a kernel for the step as it is.

Two kernels: `bytes` loads the codes as int8 elements, which Gluon (as Triton) keeps one to a
16-bit register, so the loaded words are split into bytes and packed again for the
conversion; `pairs` loads them as fp16-typed elements, two codes each, so a 32-bit register
holds four codes as they lie in memory and becomes two fp16 pairs with no repacking: codes
(4j, 4j + 1) and (4j + 2, 4j + 3) are the left operands of two MMAs over half a group each,
whose right operands take x in that order.

    python benchmarks/experiments/gluon_mma_probe.py --compile-only   # sm_90, no GPU needed
    python benchmarks/experiments/gluon_mma_probe.py --out gluon_mma.json

--compile-only prints each config's registers, spills, shared memory, global load widths and
MMA count from the sm_90 build; otherwise each config is timed as kernels_in_graph.py does (28
calls over 28 matrices in one graph) beside the shipped int8 GEMV, and checked against torch
on the dequantised weights.
"""
import argparse
import json
import os
import re
import sys
from collections import Counter

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, os.path.dirname(__file__))


@gluon.jit
def _fp16(w, ASM: gl.constexpr):
    """int8 codes -> fp16, exact. ASM: four codes a register at a time, each byte made the fp16
    1024 + 128 + q by one permute with the exponent byte 0x64 (after a XOR adds 128 to all
    four), then 1152 subtracted from each pair: five instructions for four weights. Else the
    compiler's conversion, a code at a time."""
    if ASM:
        return gl.inline_asm_elementwise(
            asm="""{
            .reg .b32 u, c;
            xor.b32 u, $2, 0x80808080;
            mov.b32 c, 0x64806480;
            prmt.b32 $0, u, 0x64646464, 0x4140;
            prmt.b32 $1, u, 0x64646464, 0x4342;
            sub.f16x2 $0, $0, c;
            sub.f16x2 $1, $1, c;
            }""",
            constraints='=r,=r,r', args=[w], dtype=gl.float16, is_pure=True, pack=4)
    return w.to(gl.float16)


@gluon.jit
def gluon_mma_gemv_kernel(W, S, X, Y, N, K: gl.constexpr, GROUP: gl.constexpr,
                          BLOCK_N: gl.constexpr, KW: gl.constexpr, WARPS: gl.constexpr,
                          AHEAD: gl.constexpr, ASM: gl.constexpr = True):
    """Y (N,) = W (N, K) x; W int8 codes (row-major), S a scale a row and group of GROUP."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, 8])
    LA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=KW)
    LB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=KW)
    CHUNKS: gl.constexpr = K // GROUP
    pid = gl.program_id(0)
    rows = gl.minimum(pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LA)), N - 1)
    cols = gl.arange(0, GROUP, layout=gl.SliceLayout(0, LA))
    w_ptr = W + gl.expand_dims(rows, 1).to(gl.int64) * K + gl.expand_dims(cols, 0)
    kb = gl.arange(0, GROUP, layout=gl.SliceLayout(1, LB))
    first = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, LB)), 0) == 0
    out_rows = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    s_ptr = S + gl.minimum(out_rows, N - 1).to(gl.int64) * CHUNKS
    out_col = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, MMA)), 0)
    total = gl.zeros([BLOCK_N, 8], gl.float32, MMA)
    w = gl.load(w_ptr)
    w2 = w
    if AHEAD == 2:
        w2 = gl.load(w_ptr + gl.minimum(1, CHUNKS - 1) * GROUP)
    for c in range(CHUNKS):
        nxt = gl.load(w_ptr + gl.minimum(c + AHEAD, CHUNKS - 1) * GROUP)
        x = gl.load(X + c * GROUP + kb).to(gl.float16)
        b = gl.where(first, gl.expand_dims(x, 1), 0.0).to(gl.float16)
        acc = mma_v2(_fp16(w, ASM), b, gl.zeros([BLOCK_N, 8], gl.float32, MMA))
        total += acc * gl.expand_dims(gl.load(s_ptr + c).to(gl.float32), 1)
        if AHEAD == 2:
            w = w2
            w2 = nxt
        else:
            w = nxt
    y = gl.sum(gl.where(out_col == 0, total, 0.0), axis=1)
    gl.store(Y + out_rows, y.to(Y.dtype.element_ty), mask=out_rows < N)


@gluon.jit
def _pair_codes(p):
    """A register of two fp16-typed elements = four int8 codes -> two fp16 tensors like p:
    codes 0, 1 and codes 2, 3 of each register, exact (the permute of _fp16)."""
    return gl.inline_asm_elementwise(
        asm="""{
        .reg .b32 u, c;
        xor.b32 u, $2, 0x80808080;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, u, 0x64646464, 0x4140;
        prmt.b32 $1, u, 0x64646464, 0x4342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        constraints='=r,=r,r', args=[p], dtype=(gl.float16, gl.float16), is_pure=True, pack=2)


@gluon.jit
def gluon_mma_pairs_kernel(W, S, X, Y, N, K: gl.constexpr, GROUP: gl.constexpr,
                           BLOCK_N: gl.constexpr, KW: gl.constexpr, WARPS: gl.constexpr,
                           AHEAD: gl.constexpr):
    """gluon_mma_gemv_kernel with W's codes read as fp16-typed pairs (N, K / 2), so that a
    32-bit register holds four codes as they lie in memory (no byte split after the load):
    each register becomes two fp16 pairs, codes (4j, 4j + 1) and (4j + 2, 4j + 3), the A
    operands of two MMAs of K = GROUP / 2 whose right operands take x in the same order."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, 8])
    LA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=KW)
    LB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=KW)
    CHUNKS: gl.constexpr = K // GROUP
    HALF: gl.constexpr = GROUP // 2  # fp16-typed elements (code pairs) a row of a group
    pid = gl.program_id(0)
    rows = gl.minimum(pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LA)), N - 1)
    cols = gl.arange(0, HALF, layout=gl.SliceLayout(0, LA))
    w_ptr = W + gl.expand_dims(rows, 1).to(gl.int64) * (K // 2) + gl.expand_dims(cols, 0)
    m = gl.arange(0, HALF, layout=gl.SliceLayout(1, LB))
    x_lo = 4 * (m // 2) + m % 2  # the code of element m of the first pair tensor
    ones = gl.full([HALF, 8], 1.0, gl.float16, LB)
    out_rows = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    s_ptr = S + gl.minimum(out_rows, N - 1).to(gl.int64) * CHUNKS
    total = gl.zeros([BLOCK_N, 8], gl.float32, MMA)
    w = gl.load(w_ptr)
    w2 = w
    if AHEAD == 2:
        w2 = gl.load(w_ptr + gl.minimum(1, CHUNKS - 1) * HALF)
    for c in range(CHUNKS):
        nxt = gl.load(w_ptr + gl.minimum(c + AHEAD, CHUNKS - 1) * HALF)
        x0 = gl.load(X + c * GROUP + x_lo).to(gl.float16)
        x1 = gl.load(X + c * GROUP + x_lo + 2).to(gl.float16)
        a0, a1 = _pair_codes(w)
        acc = mma_v2(a0, gl.expand_dims(x0, 1) * ones, gl.zeros([BLOCK_N, 8], gl.float32, MMA))
        acc = mma_v2(a1, gl.expand_dims(x1, 1) * ones, acc)
        total += acc * gl.expand_dims(gl.load(s_ptr + c).to(gl.float32), 1)
        if AHEAD == 2:
            w = w2
            w2 = nxt
        else:
            w = nxt
    out_col = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, MMA)), 0)
    y = gl.sum(gl.where(out_col == 0, total, 0.0), axis=1)  # the 8 columns are equal
    gl.store(Y + out_rows, y.to(Y.dtype.element_ty), mask=out_rows < N)


# kernel -> (the codes' view: int8 bytes or fp16-typed pairs, the kernel)
KERNELS = {'bytes': ('int8', gluon_mma_gemv_kernel), 'pairs': ('fp16', gluon_mma_pairs_kernel)}


def gluon_mma_gemv(kernel, w, x, y, block_n, kw, warps, ahead):
    """Y = W x through KERNELS[kernel] at (BLOCK_N, k_width, warps, chunks ahead)."""
    import torch
    view, fn = KERNELS[kernel]
    n, k = w.q.shape
    fn[(triton.cdiv(n, block_n),)](
        w.q.view(getattr(torch, 'float16' if view == 'fp16' else 'int8')), w.scale, x, y, n, k,
        GROUP=w.group, BLOCK_N=block_n, KW=kw, WARPS=warps, AHEAD=ahead, num_warps=warps)
    return y


SHAPES = {'gate_up': (2 * 18944, 3584), 'o_proj': (3584, 3584), 'down': (3584, 18944)}
# (kernel, BLOCK_N, k_width, warps, chunks ahead); BLOCK_N a multiple of 16 x warps. k_width:
# consecutive elements a thread, 16 codes (bytes) or 8 pairs (pairs) = 16-byte loads
CONFIGS = [('bytes', 64, 16, 4, 1), ('bytes', 128, 16, 8, 1), ('bytes', 64, 8, 4, 1),
           ('pairs', 64, 8, 4, 1), ('pairs', 128, 8, 4, 1), ('pairs', 128, 8, 8, 1),
           ('pairs', 128, 8, 4, 2), ('pairs', 256, 8, 8, 1), ('pairs', 64, 4, 4, 1)]


def compile_only():
    """Each config built for sm_90 (no GPU): registers, spills, loads, the loop's SASS."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from compile_sm90 import _resources
    for kernel, bn, kw, warps, ahead in CONFIGS:
        view, fn = KERNELS[kernel]
        names = fn.arg_names
        types = {'W': '*i8' if view == 'int8' else '*fp16', 'S': '*bf16', 'X': '*bf16',
                 'Y': '*bf16', 'N': 'i32'}
        consts = dict(K=3584, GROUP=128, BLOCK_N=bn, KW=kw, WARPS=warps, AHEAD=ahead)
        if kernel == 'bytes':
            consts['ASM'] = True
        src = GluonASTSource(fn, {n: types.get(n, 'constexpr') for n in names},
                             {(names.index(c),): v for c, v in consts.items()},
                             {(names.index(a),): [['tt.divisibility', 16]]
                              for a in ('W', 'S', 'X', 'Y')})
        out = triton.compile(src, target=GPUTarget('cuda', 90, 32),
                             options={'num_warps': warps})
        res = _resources(out)
        loads = Counter(re.findall(r'ld\.global[.\w]*', out.asm['ptx']))
        body = _loop_sass(out)
        ops = Counter(re.sub(r'.*?\*/\s*(@!?P\d\s+)?', '', ln).split()[0].split('.')[0]
                      for ln in body)
        per_weight = len(body) * 32 * warps / (bn * 128)
        print(f'{kernel} rows {bn:3d} k_width {kw:2d} warps {warps} ahead {ahead}: {res}, '
              f'loads {dict(loads)}; loop {len(body)} SASS instructions a thread, '
              f'{per_weight:.2f} a weight: {dict(ops.most_common(6))}')


def _loop_sass(compiled):
    """The SASS instructions of the kernel's loop: from the target of its backward branch to
    that branch."""
    import subprocess
    import tempfile
    tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                        'nvdisasm')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(compiled.asm['cubin'])
        f.flush()
        sass = subprocess.run([tool, '-c', f.name], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    branch = next(i for i, ln in enumerate(sass) if re.search(r'@!?P\d+ BRA', ln))
    label = re.search(r'`\((\.L_x_\d+)\)', sass[branch]).group(1)
    start = next(i for i, ln in enumerate(sass) if ln.strip().startswith(label + ':'))
    return [ln for ln in sass[start:branch + 1] if re.search(r'/\*[0-9a-f]{4}\*/', ln)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out')
    ap.add_argument('--shapes', nargs='+', default=list(SHAPES))
    ap.add_argument('--compile-only', action='store_true')
    args = ap.parse_args()
    if args.compile_only:
        return compile_only()
    import torch
    from decode_monitor.engine.fused import gemv as G
    from decode_monitor.engine.fused.configs import GemvConfig
    from decode_monitor.engine.fused.quant import quantize, weight_nbytes
    from kernels_in_graph import graph_us, LAYERS
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        ws = [quantize(torch.randn(n, k, device='cuda', dtype=torch.bfloat16) * k ** -0.5,
                       'int8') for _ in range(LAYERS)]
        nbytes = weight_nbytes(ws[0])
        x = torch.randn(k, device='cuda', dtype=torch.bfloat16)
        ys = torch.zeros(LAYERS, n, device='cuda', dtype=torch.bfloat16)
        ref = (ws[0].codes().float() * ws[0].scale.float().repeat_interleave(ws[0].group, 1)
               ) @ x.float()
        runs = [('shipped int8 (16, 512, 4, 2)', lambda i, c=GemvConfig(16, 512, 4, 2):
                 G.gemv(ws[i], x, ys[i], config=c))]
        runs += [(f'gluon mma {cfg}', lambda i, cfg=cfg: gluon_mma_gemv(cfg[0], ws[i], x, ys[i],
                                                                        *cfg[1:]))
                 for cfg in CONFIGS]
        for label, call in runs:
            ys.fill_(float('nan'))
            try:
                us = graph_us([lambda i=i: call(i) for i in range(LAYERS)])
            except Exception as exc:  # a config this GPU cannot run
                print(f'{name:8s} {label}: {type(exc).__name__} '
                      f'{str(exc).splitlines()[0][:120]}', flush=True)
                continue
            err = float((ys[0].float() - ref).norm() / ref.norm())
            rows.append({'shape': name, 'kernel': label, 'us': us, 'tb_s': nbytes / us / 1e6,
                         'rel_err': err})
            print(f'{name:8s} {label:36s} {us:7.2f} us {nbytes / us / 1e6:5.2f} TB/s '
                  f'err {err:.1e}', flush=True)
        ws = ys = None
        torch.cuda.empty_cache()
    with open(args.out, 'w') as f:
        json.dump({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
                   'triton': triton.__version__, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
