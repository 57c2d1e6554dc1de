"""int8 GEMV on tensor cores: does dequantising to fp16 and `tl.dot` stream faster than FMAs?

The shipped int8 GEMVs multiply each weight on the CUDA cores: a byte permute, a subtract and
an FMA a weight (and x's share of the work), where a bf16 GEMV spends about two instructions a
weight on half as many weights a byte. Here a row block's codes are read as an int8 tile,
converted to fp16 (exact: |q| <= 127), and multiplied with x on the tensor cores: x (fp16) is
column 0 of a (BLOCK_K, 16) operand whose other columns are zeros, each group's dot is scaled
by the rows' group scales, and column 0 of the accumulator is the result. Triton pipelines the
tile through shared memory (num_stages) and converts it in the dot operand's registers.

Each config is timed as kernels_in_graph.py does (28 calls over 28 matrices in one graph),
beside the shipped int8 GEMV on the same matrices; the result is checked against torch on the
dequantised weights.

    python benchmarks/experiments/mma_gemv_probe.py --out mma.json
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, os.path.dirname(__file__))
from decode_monitor.engine.fused import gemv as G  # noqa: E402
from decode_monitor.engine.fused.configs import GemvConfig  # noqa: E402
from decode_monitor.engine.fused.quant import quantize, weight_nbytes  # noqa: E402
from kernels_in_graph import graph_us, LAYERS  # noqa: E402


@triton.jit
def mma_gemv_kernel(W, S, X, Y, N, K: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """Y (N,) = W (N, K) x, W int8 codes with a scale a group of GROUP (BLOCK_K = GROUP)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(rows, N - 1)
    col = tl.arange(0, 16)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    w_rows = W + rows.to(tl.int64)[:, None] * K
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w = tl.load(w_rows + k0 + kk[None, :])
        x = tl.load(X + k0 + kk).to(tl.float16)
        xm = tl.where(col[None, :] == 0, x[:, None], 0.0).to(tl.float16)
        d = tl.dot(w.to(tl.float16), xm)
        s = tl.load(S + rows * (K // GROUP) + k0 // GROUP).to(tl.float32)
        acc += d * s[:, None]
    y = tl.sum(tl.where(col[None, :] == 0, acc, 0.0), axis=1)
    tl.store(Y + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), y.to(Y.dtype.element_ty),
             mask=tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N) < N)


def mma_gemv(w, x, y, block_n, stages, warps):
    n, k = w.q.shape
    mma_gemv_kernel[(triton.cdiv(n, block_n),)](
        w.q, w.scale, x, y, n, k, GROUP=w.group, BLOCK_N=block_n, BLOCK_K=w.group,
        STAGES=stages, num_warps=warps)
    return y


SHAPES = {'gate_up': (2 * 18944, 3584), 'o_proj': (3584, 3584), 'down': (3584, 18944)}
CONFIGS = [(bn, st, w) for bn in (16, 32, 64) for st in (2, 3, 4) for w in (4, 8)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', required=True)
    ap.add_argument('--shapes', nargs='+', default=list(SHAPES))
    args = ap.parse_args()
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        ws = [quantize(torch.randn(n, k, device='cuda', dtype=torch.bfloat16) * k ** -0.5,
                       'int8') for _ in range(LAYERS)]
        nbytes = weight_nbytes(ws[0])
        x = torch.randn(k, device='cuda', dtype=torch.bfloat16)
        ys = torch.zeros(LAYERS, n, device='cuda', dtype=torch.bfloat16)
        ref = (ws[0].dequantize().float() @ x.float()) if hasattr(ws[0], 'dequantize') else None
        if ref is None:
            codes = ws[0].codes().float()
            scale = ws[0].scale.float().repeat_interleave(ws[0].group, dim=1)
            ref = (codes * scale) @ x.float()
        shipped = GemvConfig(16, 512, 4, 2)
        us = graph_us([lambda i=i: G.gemv(ws[i], x, ys[i], config=shipped)
                       for i in range(LAYERS)])
        err = float((ys[0].float() - ref).norm() / ref.norm())
        rows.append({'shape': name, 'kernel': 'shipped int8 (16, 512, 4, 2)', 'us': us,
                     'tb_s': nbytes / us / 1e6, 'rel_err': err})
        print(f'{name:8s} shipped (16, 512, 4, 2)       {us:7.2f} us {nbytes / us / 1e6:5.2f} '
              f'TB/s err {err:.1e}', flush=True)
        for bn, st, warps in CONFIGS:
            try:
                ys.zero_()
                us = graph_us([lambda i=i: mma_gemv(ws[i], x, ys[i], bn, st, warps)
                               for i in range(LAYERS)])
            except Exception as exc:  # a config this GPU cannot run
                print(f'{name:8s} mma {bn, st, warps}: {type(exc).__name__} '
                      f'{str(exc).splitlines()[0][:120]}', flush=True)
                continue
            err = float((ys[0].float() - ref).norm() / ref.norm())
            rows.append({'shape': name, 'kernel': f'mma (rows {bn}, stages {st}, warps {warps})',
                         'us': us, 'tb_s': nbytes / us / 1e6, 'rel_err': err})
            print(f'{name:8s} mma rows {bn:3d} stages {st} warps {warps}  {us:7.2f} us '
                  f'{nbytes / us / 1e6:5.2f} TB/s err {err:.1e}', flush=True)
        ws = ys = None
        torch.cuda.empty_cache()
    with open(args.out, 'w') as f:
        json.dump({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
                   'triton': triton.__version__, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
