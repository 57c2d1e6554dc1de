"""Quantised gate/up GEMVs whose code words arrive by TMA, against the shipped kernel, in a graph.

The shipped int4 gate/up GEMV streams at about 2.1 TB/s on an H200 with 3 programs an SM
(167 registers) and load latency its top stall: each program holds one chunk of codes in
registers, too few bytes in flight for the GPU's bandwidth. Here the code words of a chunk are
copied into shared memory by the tensor memory accelerator (a host-side tensor descriptor;
Triton's pipeliner issues the copies STAGES - 1 chunks ahead), so bytes in flight no longer
cost registers. Scales, offsets and x are read as the shipped kernel reads them (the scales'
rows, 56 bytes on qwen2.5-7b, are no TMA tile), and the dequantisation is the shipped code
(dequant.py). Gate/up with RMSNorm and SiLU, no split-K, no tail rows (N a multiple of
BLOCK_N).

Both kernels are captured 28 times over 28 distinct matrices in one graph (as
kernels_in_graph.py does) and replayed; us per call and TB/s of the matrix's bytes. Output
checked against the shipped kernel's.

    python benchmarks/experiments/tma_gemv_probe.py [--formats int4 int8] [--out DIR]
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
from decode_monitor.engine.fused import gemv as G, pdl  # noqa: E402
from decode_monitor.engine.fused.dequant import (  # noqa: E402
    _int4_rows, _int4_x, _int8_rows, _int8_x)
from decode_monitor.engine.fused.quant import quantize, weight_nbytes  # noqa: E402
from kernels_in_graph import graph_us  # noqa: E402

LAYERS = 28
N, K = 18944, 3584  # qwen2.5-7b's gate/up
SHIPPED = {'int4': [(64, 256, 4, 1, 2), (64, 256, 4, 1)], 'int8': [(16, 512, 4, 2)]}
TMA = {'int4': [(64, 256, 4, 3), (64, 256, 4, 4), (32, 256, 4, 4), (32, 256, 4, 6),
                (32, 512, 4, 3), (16, 512, 4, 4), (64, 256, 8, 4), (128, 256, 8, 3)],
       'int8': [(16, 512, 4, 3), (16, 512, 4, 4), (8, 512, 4, 4), (8, 512, 4, 6),
                (32, 512, 4, 3), (32, 256, 4, 4), (16, 1024, 4, 3), (32, 512, 8, 3)]}


@triton.jit
def tma_gated_kernel(Wd, S, Z, X, NW, Y, N, K: tl.constexpr, stride_s, eps,
                     INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
                     PTX: tl.constexpr):
    """Y = silu(g) * u, [g; u] = W rmsnorm(x); W's code words through the descriptor Wd."""
    PER_WORD: tl.constexpr = 8 if INT4 else 4
    NSUB: tl.constexpr = BLOCK_K // (4 * PER_WORD)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_a = tl.zeros((BLOCK_N, NSUB), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, NSUB), dtype=tl.float32)
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    off_a = rows.to(tl.int64)[:, None] * stride_s
    off_b = (rows + N).to(tl.int64)[:, None] * stride_s
    pdl.wait_for_previous_kernel(PDL)
    for c in tl.range(0, K // BLOCK_K, num_stages=STAGES):
        k0 = c * BLOCK_K
        wa = tl.reshape(Wd.load([pid * BLOCK_N, k0 // PER_WORD]), (BLOCK_N, NSUB, 4))
        wb = tl.reshape(Wd.load([N + pid * BLOCK_N, k0 // PER_WORD]), (BLOCK_N, NSUB, 4))
        g = ((k0 + tl.arange(0, NSUB) * (4 * PER_WORD)) // GROUP)[None, :]
        sa = tl.load(S + off_a + g)
        sb = tl.load(S + off_b + g)
        if INT4:
            ma = tl.load(Z + off_a + g)
            mb = tl.load(Z + off_b + g)
            xs, sq = _int4_x(X, NW, k0, K, True, GROUP, BLOCK_K, True, '')
            acc_a += _int4_rows(wa, sa, ma, xs)
            acc_b += _int4_rows(wb, sb, mb, xs)
        else:
            xs, sq = _int8_x(X, NW, k0, K, True, BLOCK_K, True, '')
            acc_a += _int8_rows(wa, sa, sa, xs, PTX)
            acc_b += _int8_rows(wb, sb, sb, xs, PTX)
        ss += sq
    pdl.allow_next_kernel(PDL)
    rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    ga = tl.sum(acc_a, axis=1) * rstd
    up = tl.sum(acc_b, axis=1) * rstd
    tl.store(Y + rows, (ga * tl.sigmoid(ga) * up).to(Y.dtype.element_ty))


def tma_gated(w, x, out, norm_weight, eps, config):
    block_n, block_k, warps, stages = config
    codes = w.q.view(torch.int32)
    per_word = 8 if w.fmt == 'int4' else 4
    desc = TensorDescriptor.from_tensor(codes, [block_n, block_k // per_word])
    offset = w.offset if w.offset is not None else w.scale
    n = out.shape[0]
    tma_gated_kernel[(n // block_n,)](
        desc, w.scale, offset, x, norm_weight, out, n, x.shape[0], w.scale.stride(0), eps,
        INT4=w.fmt == 'int4', GROUP=w.group, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
        PTX=G._ptx(), num_warps=warps, **pdl.launch_args(x.device))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--formats', nargs='+', default=['int4', 'int8'])
    p.add_argument('--out', default=None)
    p.add_argument('--layers', type=int, default=LAYERS)
    args = p.parse_args()
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    n, k = (N, K) if dev == 'cuda' else (256, 512)
    layers = args.layers if dev == 'cuda' else 1
    torch.manual_seed(0)
    rows = []
    for fmt in args.formats:
        weights = [quantize(torch.randn(2 * n, k, device=dev, dtype=torch.bfloat16)
                            * k ** -0.5, fmt) for _ in range(layers)]
        nbytes = weight_nbytes(weights[0])
        x = torch.randn(k, device=dev, dtype=torch.bfloat16)
        g = torch.rand(k, device=dev, dtype=torch.bfloat16) + 0.5
        ref = torch.zeros(n, device=dev, dtype=torch.bfloat16)
        G.gemv(weights[0], x, ref, norm_weight=g, gated=True, eps=1e-5,
               config=SHIPPED[fmt][0])
        ys = torch.zeros(layers, n, device=dev, dtype=torch.bfloat16)
        cases = [('shipped', c) for c in SHIPPED[fmt]] + [('tma', c) for c in TMA[fmt]]
        for name, config in cases:
            if dev == 'cpu' and name == 'tma' and config[0] > 32:
                continue
            fn = G.gemv if name == 'shipped' else None
            if fn is None:
                calls = [lambda i=i, c=config: tma_gated(weights[i], x, ys[i], g, 1e-5, c)
                         for i in range(layers)]
            else:
                calls = [lambda i=i, c=config: G.gemv(weights[i], x, ys[i], norm_weight=g,
                                                      gated=True, eps=1e-5, config=c)
                         for i in range(layers)]
            ys.fill_(float('nan'))
            try:
                if dev == 'cuda':
                    us = graph_us(calls)
                else:
                    calls[0]()
                    us = float('nan')
            except Exception as exc:  # a config this GPU or Triton cannot run
                print(f'{fmt} {name} {config}: {type(exc).__name__}: {str(exc)[:200]}',
                      flush=True)
                continue
            err = ((ys[0].float() - ref.float()).norm() / ref.float().norm()).item()
            row = {'fmt': fmt, 'kernel': name, 'config': list(config), 'us': us,
                   'tb_s': nbytes / us / 1e6, 'rel_err_vs_shipped': err}
            rows.append(row)
            print(f"{fmt:5} {name:8} {str(config):22} {us:8.2f} us  {row['tb_s']:5.2f} TB/s"
                  f'  err {err:.2e}', flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'tma_gemv_probe.json'), 'w') as f:
            json.dump({'device': torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
                       'layers': layers, 'n': n, 'k': k, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
