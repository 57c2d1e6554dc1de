"""int4 gate/up GEMV with every layout set by hand (Gluon), against the shipped kernel, in a graph.

Compiled for sm_90, the shipped int4 loop converts layouts through shared memory in every
iteration (x's tiles into the words' layout, the dots into the scales' layout: about a dozen
CTA barriers a chunk; benchmarks/NOTES.md), which Triton's layout assignment does not let a
kernel avoid. Here the layouts are chosen so that nothing moves between threads in the K loop:
the code words are a (BLOCK_N, NSUB, 4) tile, four consecutive words a thread (one 16-byte
load); each thread loads the x' of its own sub-block in the slice of that layout (x is
re-read by the threads of other rows, from L1); scales and offsets are loaded in the layout of
the sub-block dots; the dots are summed in the thread. The next chunk's words, scales and
offsets are loaded before the current one is multiplied (a register prefetch), and the first
chunk before the PDL wait. The arithmetic is the shipped kernel's (dequant.py: codes as fp32
denormals, x scaled per lane). Configs ending in 's' stage x' in shared memory once a program
instead of reading it in every chunk: that version is the product's kernel now
(engine/fused/staged.py), which these cells call.

    python benchmarks/experiments/gluon_gemv_probe.py [--out DIR]
"""
import argparse
import json
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
from decode_monitor.engine.fused import gemv as G, pdl  # noqa: E402
from decode_monitor.engine.fused.configs import GemvConfig  # noqa: E402
from decode_monitor.engine.fused.quant import quantize, weight_nbytes  # noqa: E402
from kernels_in_graph import graph_us  # noqa: E402

LAYERS = 28
N, K = 18944, 3584  # qwen2.5-7b's gate/up
SHIPPED = [(64, 256, 4, 1, 2), (64, 256, 4, 1)]
# (rows a thread R, threads on rows TR, warps, BLOCK_K): BLOCK_N = R * TR * warps,
# threads on sub-blocks TS = 32 / TR, NSUB = BLOCK_K / 32 = TS
GLUON = [(4, 4, 4, 256), (2, 4, 4, 256), (8, 4, 4, 256), (4, 4, 2, 256), (2, 4, 8, 256),
         (4, 2, 4, 512), (2, 2, 4, 512), (8, 8, 4, 128), (4, 8, 4, 128),
         # x' staged in shared memory once a program (what became engine/fused/staged.py)
         (2, 4, 4, 256, 's'), (4, 4, 4, 256, 's'), (2, 2, 4, 512, 's'), (4, 2, 4, 512, 's'),
         (2, 4, 8, 256, 's'), (1, 4, 4, 256, 's'), (4, 4, 2, 256, 's'), (1, 2, 4, 512, 's'),
         (2, 2, 8, 512, 's'), (1, 2, 8, 512, 's')]
DOT_EXP: gl.constexpr = gl.constexpr(48)


@gluon.jit
def _load_chunk(W, S, Z, w_off, s_off, k0, GROUP: gl.constexpr, NSUB: gl.constexpr):
    """Code words (BLOCK_N, NSUB, 4) and the sub-blocks' scales and offsets (BLOCK_N, NSUB)."""
    words = gl.load(W + w_off + k0 // 8)
    g = k0 // GROUP
    return words, gl.load(S + s_off + g), gl.load(Z + s_off + g)


@gluon.jit
def gluon_gated_kernel(W, S, Z, X, NW, Y, N, K: gl.constexpr, stride_w, stride_s, eps,
                       GROUP: gl.constexpr, R: gl.constexpr, TR: gl.constexpr,
                       WARPS: gl.constexpr, BLOCK_K: gl.constexpr, PDL: gl.constexpr):
    TS: gl.constexpr = 32 // TR
    NSUB: gl.constexpr = BLOCK_K // 32
    BLOCK_N: gl.constexpr = R * TR * WARPS
    GW: gl.constexpr = GROUP // 8  # words a group
    SPG: gl.constexpr = GW // 4  # sub-blocks a group
    L3: gl.constexpr = gl.BlockedLayout([R, NSUB // TS, 4], [TR, TS, 1], [WARPS, 1, 1], [2, 1, 0])
    LD: gl.constexpr = gl.SliceLayout(2, L3)  # (BLOCK_N, NSUB): dots, scales, accumulators
    LX: gl.constexpr = gl.SliceLayout(0, L3)  # (NSUB, 4): one lane's x'
    pid = gl.program_id(0)
    rows = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD))
    subs_d = gl.arange(0, NSUB, layout=gl.SliceLayout(0, LD))
    # word (row, s, t) at row * stride_w + k0 / 8 + 4 s + t
    r3 = gl.expand_dims(gl.expand_dims(rows, 1), 2)
    s3 = gl.expand_dims(gl.expand_dims(gl.arange(0, NSUB, layout=gl.SliceLayout(1, LX)), 1), 0)
    t3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, LX)), 0), 0)
    wa_off = r3.to(gl.int64) * stride_w + s3 * 4 + t3
    wb_off = (r3 + N).to(gl.int64) * stride_w + s3 * 4 + t3
    # scale (row, s) at row * stride_s + (k0 + 32 s) / GROUP
    sa_off = gl.expand_dims(rows, 1).to(gl.int64) * stride_s + gl.expand_dims(subs_d // SPG, 0)
    sb_off = gl.expand_dims(rows + N, 1).to(gl.int64) * stride_s + gl.expand_dims(
        subs_d // SPG, 0)
    # x' of lane i of word t of sub-block s: x[k0 + (s // SPG) GROUP + (s % SPG) 4 + t + i GW]
    xs_ = gl.arange(0, NSUB, layout=gl.SliceLayout(1, LX))
    xt_ = gl.arange(0, 4, layout=gl.SliceLayout(0, LX))
    x_off = gl.expand_dims((xs_ // SPG) * GROUP + (xs_ % SPG) * 4, 1) + gl.expand_dims(xt_, 0)

    acc_a = gl.zeros([BLOCK_N, NSUB], gl.float32, LD)
    acc_b = gl.zeros([BLOCK_N, NSUB], gl.float32, LD)
    ss = gl.zeros([NSUB, 4], gl.float32, LX)
    wa, sa, ma = _load_chunk(W, S, Z, wa_off, sa_off, 0, GROUP, NSUB)
    wb, sb, mb = _load_chunk(W, S, Z, wb_off, sb_off, 0, GROUP, NSUB)
    pdl.wait_for_previous_kernel(PDL)
    CHUNKS: gl.constexpr = K // BLOCK_K
    for c in range(CHUNKS):
        k0 = c * BLOCK_K
        nk = gl.minimum(k0 + BLOCK_K, K - BLOCK_K)  # the last chunk reloads itself, from cache
        na, nsa, nma = _load_chunk(W, S, Z, wa_off, sa_off, nk, GROUP, NSUB)
        nb, nsb, nmb = _load_chunk(W, S, Z, wb_off, sb_off, nk, GROUP, NSUB)
        high_a = wa.to(gl.uint32, bitcast=True) >> 16  # a logical shift: one instruction
        high_b = wb.to(gl.uint32, bitcast=True) >> 16
        pa = gl.zeros([BLOCK_N, NSUB, 4], gl.float32, L3)
        pb = gl.zeros([BLOCK_N, NSUB, 4], gl.float32, L3)
        xsum = gl.zeros([NSUB, 4], gl.float32, LX)
        for i in gl.static_range(8):
            cols = k0 + x_off + i * GW
            x = gl.load(X + cols).to(gl.float32)
            ss += x * x
            x = x * gl.load(NW + cols).to(gl.float32)
            xsum += x
            x3 = gl.expand_dims(x * (2.0 ** (149 - DOT_EXP - 4 * (i % 4))), 0)
            if i < 4:
                fa = (wa & (15 << (4 * (i % 4)))).to(gl.float32, bitcast=True)
                fb = (wb & (15 << (4 * (i % 4)))).to(gl.float32, bitcast=True)
            else:
                fa = (high_a & (15 << (4 * (i % 4)))).to(gl.float32, bitcast=True)
                fb = (high_b & (15 << (4 * (i % 4)))).to(gl.float32, bitcast=True)
            pa += fa * x3
            pb += fb * x3
        xs2 = gl.sum(gl.expand_dims(xsum, 0), axis=2)  # (1, NSUB) in LD
        scale: gl.constexpr = 2.0 ** DOT_EXP
        acc_a += gl.sum(pa, axis=2) * (sa.to(gl.float32) * scale) + ma.to(gl.float32) * xs2
        acc_b += gl.sum(pb, axis=2) * (sb.to(gl.float32) * scale) + mb.to(gl.float32) * xs2
        wa, sa, ma = na, nsa, nma
        wb, sb, mb = nb, nsb, nmb
    pdl.allow_next_kernel(PDL)
    rstd = gl.rsqrt(gl.sum(gl.sum(ss, axis=1), axis=0) / K + eps)
    ga = gl.sum(acc_a, axis=1) * rstd
    up = gl.sum(acc_b, axis=1) * rstd
    y = ga / (1.0 + gl.exp(-ga)) * up
    gl.store(Y + rows, y.to(gl.bfloat16))


def gluon_gated(w, x, out, norm_weight, eps, config):
    r, tr, warps, block_k, *staged = config
    n = out.shape[0]
    if staged:  # x' staged in shared memory: the product's kernel (engine/fused/staged.py)
        return G.gemv(w, x, out, norm_weight=norm_weight, gated=True, eps=eps,
                      config=GemvConfig(r * tr * warps, block_k, warps, 1, 1, None, True))
    codes = w.q.view(torch.int32)
    gluon_gated_kernel[(n // (r * tr * warps),)](
        codes, w.scale, w.offset, x, norm_weight, out, n, x.shape[0], codes.stride(0),
        w.scale.stride(0), eps, GROUP=w.group, R=r, TR=tr, WARPS=warps, BLOCK_K=block_k,
        num_warps=warps, **pdl.launch_args(x.device))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--out', default=None)
    p.add_argument('--eager', nargs='*', type=int, metavar='CASE',
                   help='launch these cases (indices into shipped + gluon) 3 times each, '
                   'eagerly, and time nothing: for a profiler')
    args = p.parse_args()
    torch.manual_seed(0)
    weights = [quantize(torch.randn(2 * N, K, device='cuda', dtype=torch.bfloat16) * K ** -0.5,
                        'int4') for _ in range(LAYERS)]
    nbytes = weight_nbytes(weights[0])
    x = torch.randn(K, device='cuda', dtype=torch.bfloat16)
    g = torch.rand(K, device='cuda', dtype=torch.bfloat16) + 0.5
    ref = torch.zeros(N, device='cuda', dtype=torch.bfloat16)
    G.gemv(weights[0], x, ref, norm_weight=g, gated=True, eps=1e-5, config=SHIPPED[0])
    ys = torch.zeros(LAYERS, N, device='cuda', dtype=torch.bfloat16)
    rows = []
    cases = [('shipped', c) for c in SHIPPED] + [('gluon', c) for c in GLUON]
    if args.eager is not None:
        for name, config in [cases[i] for i in args.eager]:
            for i in range(3):
                if name == 'shipped':
                    G.gemv(weights[i], x, ys[i], norm_weight=g, gated=True, eps=1e-5,
                           config=config)
                else:
                    gluon_gated(weights[i], x, ys[i], g, 1e-5, config)
            torch.cuda.synchronize()
        return
    for name, config in cases:
        if name == 'shipped':
            calls = [lambda i=i, c=config: G.gemv(weights[i], x, ys[i], norm_weight=g,
                                                  gated=True, eps=1e-5, config=c)
                     for i in range(LAYERS)]
        else:
            calls = [lambda i=i, c=config: gluon_gated(weights[i], x, ys[i], g, 1e-5, c)
                     for i in range(LAYERS)]
        ys.fill_(float('nan'))
        try:
            us = graph_us(calls)
        except Exception as exc:
            print(f'{name} {config}: {type(exc).__name__}: {str(exc)[:400]}', flush=True)
            continue
        err = ((ys[0].float() - ref.float()).norm() / ref.float().norm()).item()
        row = {'kernel': name, 'config': list(config), 'us': us, 'tb_s': nbytes / us / 1e6,
               'rel_err_vs_shipped': err}
        rows.append(row)
        print(f"{name:8} {str(config):22} {us:8.2f} us  {row['tb_s']:5.2f} TB/s  err {err:.2e}",
              flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'gluon_gemv_probe.json'), 'w') as f:
            json.dump({'device': torch.cuda.get_device_name(), 'layers': LAYERS, 'n': N, 'k': K,
                       'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
