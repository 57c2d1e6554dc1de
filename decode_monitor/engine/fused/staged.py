"""int4 gate/up GEMV with x' staged in shared memory and every layout set by hand (Gluon).

The same product as gemv.gemv_kernel's GATED int4 case (RMSNorm of x, [gate; up] = W x',
silu(gate) * up), the same arithmetic (dequant.py: a code masked in place is an fp32 denormal,
x' scaled per lane, s sum q x' + m sum x' per sub-block), organised so that no value moves
between threads inside the K loop:

- Once a program, after the PDL wait, x' = x g is computed for all of K, scaled for each lane's
  denormals, and stored in shared memory in the order the loop reads it, with each sub-block's
  sum of x g beside it; sum(x^2) for the norm is taken there too.
- The code words are a (BLOCK_N, NSUB, 4) tile, four consecutive words (one 16-byte load) of a
  row a thread; a thread reads the x' of its own sub-block from shared memory (one 16-byte read
  a lane), the scales and offsets in the layout of the sub-block dots, and sums its dots
  itself. The next chunk's words, scales and offsets are loaded before the current chunk is
  multiplied, the first chunk before the PDL wait (the weights are constant).

Written in Triton's language, the loop recomputes x' from global memory in every iteration
and moves it, and the dots, between layouts through shared memory (a dozen barriers a chunk,
benchmarks/NOTES.md); Triton's layout assignment leaves a kernel no way around that. Gluon
takes the layouts as given. It compiles for CUDA only: gemv.gemv runs this kernel where a
config asks for it (`GemvConfig.staged`) on a GPU that has Gluon's targets, and the Triton
kernel everywhere else (CPU, the interpreter, other formats and kinds).
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from decode_monitor.engine.fused import pdl

DOT_EXP = gl.constexpr(48)  # dequant.DOT_EXP: products are x q 2^-DOT_EXP


@gluon.jit
def _pdl_wait(PDL: gl.constexpr):
    if PDL:
        gl.inline_asm_elementwise('griddepcontrol.wait; // dummy $0', '=r', [], dtype=gl.int32,
                                  is_pure=False, pack=1)


@gluon.jit
def _pdl_allow(PDL: gl.constexpr):
    if PDL:
        gl.inline_asm_elementwise('griddepcontrol.launch_dependents; // dummy $0', '=r', [],
                                  dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _chunk(W, S, Z, w_off, s_off, k0, GROUP: gl.constexpr):
    """Code words (BLOCK_N, NSUB, 4) of the chunk at k0, its sub-blocks' scales and offsets."""
    g = k0 // GROUP
    return gl.load(W + w_off + k0 // 8), gl.load(S + s_off + g), gl.load(Z + s_off + g)


@gluon.jit
def _stage_x(X, NW, K: gl.constexpr, GROUP: gl.constexpr, BLOCK_K: gl.constexpr,
             CH2: gl.constexpr, NSUB: gl.constexpr, WARPS: gl.constexpr):
    """x' for the whole of K in shared memory, (CH2 * 8, NSUB, 4): [c * 8 + i, s, t] is the x g
    that lane i of word t of sub-block s of chunk c meets, scaled by 2^(149 - DOT_EXP - 4 (i % 4));
    each sub-block's sum of x g, (CH2, NSUB); and sum(x^2). CH2: the chunks, to a power of 2."""
    GW: gl.constexpr = GROUP // 8  # words a group; word c of a group holds c + i GW (quant.py)
    SPG: gl.constexpr = GW // 4  # sub-blocks a group
    CHUNKS: gl.constexpr = K // BLOCK_K
    P3: gl.constexpr = gl.BlockedLayout([1, 1, 4], [4, 8, 1], [WARPS, 1, 1], [2, 1, 0])
    q = gl.expand_dims(gl.expand_dims(
        gl.arange(0, CH2 * 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, P3))), 1), 2)
    s = gl.expand_dims(gl.expand_dims(
        gl.arange(0, NSUB, layout=gl.SliceLayout(0, gl.SliceLayout(2, P3))), 0), 2)
    t = gl.expand_dims(gl.expand_dims(
        gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, P3))), 0), 1)
    cols = (q // 8) * BLOCK_K + (s // SPG) * GROUP + (s % SPG) * 4 + t + (q % 8) * GW
    valid = (q // 8 < CHUNKS) & (s >= 0) & (t >= 0)
    x = gl.load(X + cols, mask=valid, other=0.0).to(gl.float32)
    sum_sq = gl.sum(gl.sum(gl.sum(x * x, axis=2), axis=1), axis=0)
    xg = x * gl.load(NW + cols, mask=valid, other=0.0).to(gl.float32)
    lane_scale = ((276 - DOT_EXP - 4 * (q % 4)) << 23).to(gl.float32, bitcast=True)
    # stored row-major, then viewed as CH2 * 8 tiles of (NSUB, 4), a view `index` can take
    xs = gl.allocate_shared_memory(
        gl.float32, [CH2 * 8, NSUB, 4], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]),
        xg * lane_scale)._reinterpret(gl.float32, [CH2 * 8, NSUB, 4],
                                      gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    # each sub-block's sum of x g: (CH2, NSUB, 32) summed over its 32 weights (lane, word)
    Q3: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 4, 8], [WARPS, 1, 1], [2, 1, 0])
    c2 = gl.expand_dims(gl.expand_dims(
        gl.arange(0, CH2, layout=gl.SliceLayout(1, gl.SliceLayout(2, Q3))), 1), 2)
    s2 = gl.expand_dims(gl.expand_dims(
        gl.arange(0, NSUB, layout=gl.SliceLayout(0, gl.SliceLayout(2, Q3))), 0), 2)
    p2 = gl.expand_dims(gl.expand_dims(
        gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, Q3))), 0), 1)
    cols2 = c2 * BLOCK_K + (s2 // SPG) * GROUP + (s2 % SPG) * 4 + p2 % 4 + (p2 // 4) * GW
    valid2 = (c2 < CHUNKS) & (s2 >= 0) & (p2 >= 0)
    xg2 = (gl.load(X + cols2, mask=valid2, other=0.0).to(gl.float32)
           * gl.load(NW + cols2, mask=valid2, other=0.0).to(gl.float32))
    sums = gl.allocate_shared_memory(
        gl.float32, [CH2, NSUB], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
        gl.sum(xg2, axis=2))._reinterpret(gl.float32, [CH2, NSUB],
                                          gl.SwizzledSharedLayout(1, 1, 1, [0]))
    gl.thread_barrier()
    return xs, sums, sum_sq


@gluon.jit
def staged_gated_int4_kernel(W, S, Z, X, NW, Y, N, K: gl.constexpr, stride_w, stride_s, eps,
                             GROUP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                             CH2: gl.constexpr, WARPS: gl.constexpr, PDL: gl.constexpr):
    """Y = silu(g) * u, [g; u] = W rmsnorm(x); W int4 code words (2N, K / 8), S and Z the
    scales and offsets (2N, K / GROUP). Threads: 32 / NSUB on the rows of a warp, NSUB on the
    sub-blocks; BLOCK_N / (that times WARPS) rows a thread."""
    NSUB: gl.constexpr = BLOCK_K // 32
    TR: gl.constexpr = 32 // NSUB
    R: gl.constexpr = BLOCK_N // (TR * WARPS)
    SPG: gl.constexpr = GROUP // 32
    L3: gl.constexpr = gl.BlockedLayout([R, 1, 4], [TR, NSUB, 1], [WARPS, 1, 1], [2, 1, 0])
    LD: gl.constexpr = gl.SliceLayout(2, L3)  # (BLOCK_N, NSUB): dots, scales, accumulators
    LX: gl.constexpr = gl.SliceLayout(0, L3)  # (NSUB, 4): one lane's x' of a chunk
    pid = gl.program_id(0)
    rows = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD))
    row_mask = rows < N
    rows = gl.minimum(rows, N - 1)  # tail rows load valid memory; their store is masked
    subs = gl.arange(0, NSUB, layout=gl.SliceLayout(0, LD))
    r3 = gl.expand_dims(gl.expand_dims(rows, 1), 2).to(gl.int64)
    st = (gl.expand_dims(gl.expand_dims(gl.arange(0, NSUB, layout=gl.SliceLayout(1, LX)), 1), 0)
          * 4 + gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, LX)),
                                              0), 0))
    wa_off = r3 * stride_w + st
    wb_off = (r3 + N) * stride_w + st
    r2 = gl.expand_dims(rows, 1).to(gl.int64)
    sa_off = r2 * stride_s + gl.expand_dims(subs // SPG, 0)
    sb_off = (r2 + N) * stride_s + gl.expand_dims(subs // SPG, 0)
    wa, sa, ma = _chunk(W, S, Z, wa_off, sa_off, 0, GROUP)
    wb, sb, mb = _chunk(W, S, Z, wb_off, sb_off, 0, GROUP)
    _pdl_wait(PDL)
    xs, sums, sum_sq = _stage_x(X, NW, K, GROUP, BLOCK_K, CH2, NSUB, WARPS)
    acc_a = gl.zeros([BLOCK_N, NSUB], gl.float32, LD)
    acc_b = gl.zeros([BLOCK_N, NSUB], gl.float32, LD)
    for c in range(K // BLOCK_K):
        k0 = c * BLOCK_K
        nxt = gl.minimum(k0 + BLOCK_K, K - BLOCK_K)  # the last chunk reloads itself, cached
        na, nsa, nma = _chunk(W, S, Z, wa_off, sa_off, nxt, GROUP)
        nb, nsb, nmb = _chunk(W, S, Z, wb_off, sb_off, nxt, GROUP)
        high_a = wa.to(gl.uint32, bitcast=True) >> 16  # lanes 4-7, moved to bits 0-15
        high_b = wb.to(gl.uint32, bitcast=True) >> 16
        pa = gl.zeros([BLOCK_N, NSUB, 4], gl.float32, L3)
        pb = gl.zeros([BLOCK_N, NSUB, 4], gl.float32, L3)
        for i in gl.static_range(8):
            x3 = gl.expand_dims(xs.index(c * 8 + i).load(LX), 0)
            if i < 4:
                fa = (wa & (15 << (4 * i))).to(gl.float32, bitcast=True)
                fb = (wb & (15 << (4 * i))).to(gl.float32, bitcast=True)
            else:
                fa = (high_a & (15 << (4 * (i - 4)))).to(gl.float32, bitcast=True)
                fb = (high_b & (15 << (4 * (i - 4)))).to(gl.float32, bitcast=True)
            pa += fa * x3
            pb += fb * x3
        x_sum = gl.expand_dims(sums.index(c).load(gl.SliceLayout(0, LD)), 0)
        scale: gl.constexpr = 2.0 ** DOT_EXP
        acc_a += gl.sum(pa, axis=2) * (sa.to(gl.float32) * scale) + ma.to(gl.float32) * x_sum
        acc_b += gl.sum(pb, axis=2) * (sb.to(gl.float32) * scale) + mb.to(gl.float32) * x_sum
        wa, sa, ma = na, nsa, nma
        wb, sb, mb = nb, nsb, nmb
    _pdl_allow(PDL)
    rstd = gl.rsqrt(sum_sq / K + eps)
    g = gl.sum(acc_a, axis=1) * rstd
    u = gl.sum(acc_b, axis=1) * rstd
    y = g / (1.0 + gl.exp(-g)) * u
    gl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_mask)


def fits(config, n, k, group):
    """Whether this kernel runs a gate/up of N rows each and K columns at `config`: whole
    chunks of K starting on group boundaries, a power-of-2 thread layout, and x' of all of K
    in shared memory (at most 64 KB)."""
    nsub = config.block_k // 32
    return (config.block_k % group == 0 and group % 32 == 0 and k % config.block_k == 0
            and 1 <= nsub <= 32 and config.block_n % ((32 // nsub) * config.num_warps) == 0
            and triton.next_power_of_2(k // config.block_k) * config.block_k * 4 <= 65536)


def gated_int4(w, x, out, norm_weight, eps, config):
    """out (N,) = silu(g) * u, [g; u] = W (2N, K) rmsnorm(x); w an int4 QuantWeight."""
    codes = w.q.view(torch.int32)
    n, k = out.shape[0], x.shape[0]
    staged_gated_int4_kernel[(triton.cdiv(n, config.block_n),)](
        codes, w.scale, w.offset, x, norm_weight, out, n, k, codes.stride(0),
        w.scale.stride(0), eps, GROUP=w.group, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, CH2=triton.next_power_of_2(k // config.block_k),
        WARPS=config.num_warps, num_warps=config.num_warps, **pdl.launch_args(x.device))
    return out
