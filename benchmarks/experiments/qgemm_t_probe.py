"""Does an int4 prefill GEMM with the tokens on the tensor-core instruction's M side beat the
buffer path at 64-2048 tokens?

qgemm.py puts the weight tile on the dot's left side (it may stay in registers on Hopper) and
the tokens on the right; Triton then waits on every wgmma (a register operand). Here the roles
swap: out (BLOCK_M tokens, BLOCK_N rows) = x (BLOCK_M, K) @ W.T (K, BLOCK_N), the x tile is
loaded through Triton's pipeline into shared memory and the dequantised weight tile is the
right operand, which wgmma reads from shared memory only, so Triton must store it there.

The stored int4 order (quant.py: nibble i of word c of a group is weight c + i G / 8) is kept:
the dequantised tile's rows are taken in (word, nibble) order, c 8 + i, and x's columns are
permuted once per call into the same order (`lane_order`), so no register shuffle is needed.

    python benchmarks/experiments/qgemm_t_probe.py out.json [M ...]
    python benchmarks/experiments/qgemm_t_probe.py out.json small [M ...]

Times, per qwen2.5-7b layer matrix and M, 28 distinct layers captured in one CUDA graph
(median of 10 replays): dense bf16 cuBLAS, the buffer path (unpack + cuBLAS), qgemm's table
config (M <= 128) and this kernel's candidates, every output checked against F.linear on the
dense matrix first. Writes the compiled TTGIR's count of wgmma waits per candidate. DEQ 2 uses
the product's `qgemm._lanes_bf16` (the recorded runs had the same PTX inline here).
"""
import json
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit('/', 1)[0])
import unpack_probe as P  # noqa: E402  (the probe's layers, graph timing)

from decode_monitor.engine.fused import qgemm as Q  # noqa: E402
from decode_monitor.engine.fused import unpack  # noqa: E402


def lane_order(x, group):
    """x (M, K) with each group's columns in the stored codes' order: column c 8 + i of a
    group is x's column i G / 8 + c."""
    m, k = x.shape
    return x.view(m, k // group, 8, group // 8).transpose(-1, -2).reshape(m, k)


@triton.jit
def _dequant_tile(words, s, z, DEQ: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr):
    """(G, BLOCK_N) bf16 weights of one group, rows in lane order c 8 + i, from the group's
    words (L, BLOCK_N) and its scales and offsets (BLOCK_N,): the product's `_group_tile`
    (DEQ 0 float32, 2 PTX), or DEQ 1, 2^23 + q by a mask and q by an exact subtraction."""
    if DEQ == 1:
        lane = (tl.arange(0, 8) * 4)[None, :, None]
        v = ((words[:, None, :] >> lane) & 15) | 0x4B000000
        code = v.to(tl.float32, bitcast=True) - 8388608.0
        w = (code * s.to(tl.float32)[None, None, :]
             + z.to(tl.float32)[None, None, :]).to(tl.bfloat16)
        return tl.reshape(w, (8 * L, BLOCK_N))
    return Q._group_tile(words, s, z, tl.bfloat16, DEQ == 2, L, BLOCK_N)


@triton.jit
def _qgemm_t(XP, Q, S, Z, B, OUT, M, N, K, K_SPLIT: tl.constexpr, stride_xm, stride_q,
             stride_s, stride_om, stride_p, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
             DEQ: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    part = tl.program_id(2)
    L: tl.constexpr = GROUP // 8
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_in, m_in = n < N, m < M
    n64 = tl.minimum(n, N - 1).to(tl.int64)
    x_rows = XP + tl.minimum(m, M - 1).to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.range(0, K_SPLIT, GROUP, num_stages=STAGES):
        k0 = tl.multiple_of(part * K_SPLIT + step, GROUP)
        x = tl.load(x_rows + (k0 + tl.arange(0, GROUP))[None, :])  # (BLOCK_M, G), lane order
        words = tl.load(Q + n64[None, :] * stride_q + (k0 // 8 + tl.arange(0, L))[:, None])
        s = tl.load(S + n64 * stride_s + k0 // GROUP)
        z = tl.load(Z + n64 * stride_s + k0 // GROUP)
        w = _dequant_tile(words, s, z, DEQ, L, BLOCK_N).to(x.dtype)
        acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    at = OUT + part.to(tl.int64) * stride_p + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(at, acc.to(OUT.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


def qgemm_t(x, w, bias, cfg):
    """x (M, K) @ w.dequantize().T (+ bias); cfg (BLOCK_M, BLOCK_N, warps, stages, split,
    DEQ: 0 int-to-float convert, 1 mask-and-subtract in fp32, 2 bf16x2 in inline PTX)."""
    block_m, block_n, warps, stages, split, deq = cfg
    m, k = x.shape
    n = w.shape[0]
    xp = lane_order(x, w.group)
    while split > 1 and k % (split * w.group):
        split -= 1
    k_split = k // split
    out = x.new_empty((m, n)) if split == 1 else torch.empty(
        (split, m, n), dtype=torch.float32, device=x.device)
    has_bias = bias is not None and split == 1
    kernel = _qgemm_t[(triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)](
        xp, w.q.view(torch.int32), w.scale, w.offset, bias if has_bias else w.scale, out, m, n,
        k, k_split, xp.stride(0), w.q.stride(0) // 4, w.scale.stride(0), n, m * n,
        GROUP=w.group, HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, DEQ=deq,
        num_warps=warps, num_stages=stages)
    if split > 1:
        total = out.sum(0)
        if bias is not None:
            total += bias.float()
        out = total.to(x.dtype)
    return out, kernel


CANDIDATES = [(bm, bn, warps, 3, split, deq) for deq in (0, 1, 2)
              for bm in (64, 128) for bn in (128, 256) for warps in (4, 8) for split in (1, 2, 4)
              if not (bn == 256 and bm == 128 and warps == 4)]
# the second run (M 16, 32, 256): the PTX dequantisation only, and token blocks under 64
# (Triton compiles those to mma.sync)
SMALL = [(bm, 128, warps, 3, split, 2) for bm in (16, 32, 64, 128) for warps in (4, 8)
         for split in (1, 2, 4)]


def waits(kernel):
    ir = kernel.asm.get('ttgir', '')
    return {'wgmma': ir.count('warp_group_dot ') + ir.count('warp_group_dot\n'),
            'wait0': ir.count('pendings = 0'), 'waits': ir.count('warp_group_dot_wait'),
            'local_alloc': ir.count('local_alloc')}


def main(argv):
    out_path = argv[0]
    global CANDIDATES
    if argv[1] == 'small':
        CANDIDATES = SMALL
        argv = argv[1:]
    ms = [int(a) for a in argv[1:]] or [64, 128, 512]
    layers = P.build('int4')
    buf = unpack.buffer_for([w for w, _, _ in layers[0].values()], torch.bfloat16, 'cuda')
    gen = torch.Generator(device='cuda').manual_seed(5)
    rows = []
    for m in ms:
        for name, n, k, _ in P.SHAPES:
            x = torch.randn(m, k, device='cuda', generator=gen, dtype=torch.bfloat16)
            w0, b0, d0 = layers[-1][name]
            ref = F.linear(x, d0, b0).float()
            row = {'m': m, 'matrix': name,
                   'dense': P.time_graph(lambda: [F.linear(x, ly[name][2], ly[name][1])
                                                  for ly in layers]),
                   'buffer': P.time_graph(lambda: [
                       F.linear(x, unpack.dense_into(ly[name][0], buf), ly[name][1])
                       for ly in layers])}
            if m <= 128:
                row['qgemm'] = P.time_graph(lambda: [Q.qgemm(x, ly[name][0], ly[name][1])
                                                     for ly in layers])
            best = None
            row['t'] = []
            for cfg in CANDIDATES:
                if cfg[0] > max(64, triton.next_power_of_2(m)):
                    continue
                try:
                    got, kernel = qgemm_t(x, w0, b0, cfg)
                    err = ((got.float() - ref).norm() / ref.norm()).item()
                    t = P.time_graph(lambda: [qgemm_t(x, ly[name][0], ly[name][1], cfg)
                                              for ly in layers])
                    entry = {'config': cfg, 'ms': t, 'rel_err': err, **waits(kernel)}
                except Exception as exc:  # resources this GPU lacks for a config
                    error = f'{type(exc).__name__}: {str(exc)[:160]}'
                    entry = {'config': cfg, 'ms': None, 'error': error}
                row['t'].append(entry)
                if entry['ms'] is not None and entry['rel_err'] < 1e-2 and (
                        best is None or entry['ms'] < best['ms']):
                    best = entry
            row['best'] = best
            rows.append(row)
            print(f"M={m:5d} {name:4s} dense {row['dense']:.3f} buffer {row['buffer']:.3f} "
                  f"qgemm {row.get('qgemm', float('nan')):.3f} best_t "
                  f"{best and best['ms']:.3f} {best and best['config']} "
                  f"err {best and best['rel_err']:.1e} waits {best and best['waits']}/"
                  f"{best and best['wait0']}", flush=True)
            with open(out_path, 'w') as f:
                json.dump(rows, f, indent=1)
    print('\nM      matrix  dense  buffer  qgemm   t(best)  (ms, 28 layers)')
    for r in rows:
        print(f"{r['m']:5d}  {r['matrix']:5s} {r['dense']:6.3f} {r['buffer']:7.3f} "
              f"{r.get('qgemm', float('nan')):6.3f} {r['best'] and r['best']['ms']:7.3f}")


if __name__ == '__main__':
    main(sys.argv[1:])
