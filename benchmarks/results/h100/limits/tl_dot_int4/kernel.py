"""An int4 GEMV on tensor cores through tl.dot, kept as the record of a study (not used by the
package): quant.py's int4 lanes, one group (128 weights) of BLOCK_N rows a step.

Codes become bf16 without a convert: (word >> 4j) & 0x000F000F | 0x43004300 holds lanes j and
j + 4 as the bf16 values 128 + q, one pair a 32-bit word. x is split into a bf16 high part and
a bf16 remainder (columns 0 and 1 of the dot's B operand), so the products keep about 16 bits of
x; the group's dot is then s (sum (128 + q) x) + (m - 128 s) sum x.
"""
import triton
import triton.language as tl


@triton.jit
def _bf16(t):
    return t.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def mma4_kernel(W, S, Z, X, Y, N, K: tl.constexpr, stride_w, stride_s, GROUP: tl.constexpr,
                BLOCK_N: tl.constexpr, STAGES: tl.constexpr, NPAD: tl.constexpr):
    GW: tl.constexpr = GROUP // 8
    pid = tl.program_id(0)
    rows = tl.minimum(pid * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    c = tl.arange(0, GW)
    # tile position p = 8 c + 2 j + h holds weight c + (j + 4 h) GW of the group
    p = tl.arange(0, GROUP)
    kk = p // 8 + ((p // 2) % 4 + 4 * (p % 2)) * GW
    col = tl.arange(0, NPAD)[None, :]
    acc = tl.zeros((BLOCK_N, NPAD), dtype=tl.float32)
    corr = tl.zeros((BLOCK_N,), dtype=tl.float32)
    wrow = W + rows.to(tl.int64)[:, None] * stride_w
    for g in tl.range(0, K // GROUP, num_stages=STAGES):
        words = tl.load(wrow + g * GW + c[None, :])
        x = tl.load(X + g * GROUP + kk).to(tl.float32)
        xh = x.to(tl.bfloat16)
        xl = (x - xh.to(tl.float32)).to(tl.bfloat16)
        xt = tl.where(col == 0, xh[:, None], tl.where(col == 1, xl[:, None], 0.0).to(tl.bfloat16))
        t0 = (words & 0x000F000F) | 0x43004300
        t1 = ((words >> 4) & 0x000F000F) | 0x43004300
        t2 = ((words >> 8) & 0x000F000F) | 0x43004300
        t3 = ((words >> 12) & 0x000F000F) | 0x43004300
        p0 = tl.join(_bf16(t0), _bf16(t0 >> 16))
        p1 = tl.join(_bf16(t1), _bf16(t1 >> 16))
        p2 = tl.join(_bf16(t2), _bf16(t2 >> 16))
        p3 = tl.join(_bf16(t3), _bf16(t3 >> 16))
        r = tl.join(tl.join(p0, p2), tl.join(p1, p3))  # (BLOCK_N, GW, h, j // 2, j % 2)
        wt = tl.reshape(tl.permute(r, (0, 1, 3, 4, 2)), (BLOCK_N, GROUP))
        d = tl.dot(wt, xt)  # (BLOCK_N, NPAD): columns 0 and 1 hold the two parts of x
        s = tl.load(S + rows * stride_s + g).to(tl.float32)
        m = tl.load(Z + rows * stride_s + g).to(tl.float32)
        acc += d * s[:, None]
        corr += (m - 128.0 * s) * tl.sum(x, axis=0)
    y = tl.sum(acc, axis=1) + corr
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=pid * BLOCK_N + tl.arange(0, BLOCK_N) < N)
