"""The prefill's element-wise work as one Triton pass each (the Triton path's prefill).

Between its GEMMs a prefill normalises, rotates and gates activations of T x hidden (or T x
intermediate) values. In torch ops each of those is several passes through memory with float32
temporaries (an RMSNorm: upcast, square, mean, scale, downcast, weight: about ten times the
bytes of its input); at a few thousand tokens they cost a fifth of the prefill. Here each is
one read and one write, with the same arithmetic as model.py's torch functions: statistics and
rotations in float32, rounded to the model's dtype where those round. The residual sum that
precedes each norm is made in the same pass (`add_rms_norm`), as torch makes it: the two
inputs added in float32 and rounded once.
"""
import triton
import triton.language as tl


@triton.jit
def _rms_norm(X, W, OUT, H: tl.constexpr, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    x = tl.load(X + row * H + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    y = (x * rstd).to(OUT.dtype.element_ty).to(tl.float32)  # rounded, then the weight
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(OUT + row * H + cols, (w * y).to(OUT.dtype.element_ty), mask=inside)


@triton.jit
def _add_rms_norm(X, Y, W, SUM, OUT, H: tl.constexpr, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    x = tl.load(X + row * H + cols, mask=inside, other=0.0).to(tl.float32)
    y = tl.load(Y + row * H + cols, mask=inside, other=0.0).to(tl.float32)
    total = (x + y).to(SUM.dtype.element_ty)  # the residual stream, rounded as torch rounds
    tl.store(SUM + row * H + cols, total, mask=inside)
    total = total.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(total * total, axis=0) / H + eps)
    normed = (total * rstd).to(OUT.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(OUT + row * H + cols, (w * normed).to(OUT.dtype.element_ty), mask=inside)


def add_rms_norm(x, y, weight, eps):
    """(x + y, prefill.rms_norm(x + y)) of contiguous (T, H) tensors, in one pass."""
    total, out = x.new_empty(x.shape), x.new_empty(x.shape)
    h = x.shape[-1]
    _add_rms_norm[(x.shape[0],)](x, y, weight, total, out, h, eps,
                                 BLOCK=triton.next_power_of_2(h),
                                 num_warps=8 if h >= 2048 else 4)
    return total, out


def rms_norm(x, weight, eps):
    """prefill.rms_norm of a contiguous (T, H) tensor."""
    out = x.new_empty(x.shape)
    h = x.shape[-1]
    _rms_norm[(x.shape[0],)](x, weight, out, h, eps, BLOCK=triton.next_power_of_2(h),
                             num_warps=8 if h >= 2048 else 4)
    return out


@triton.jit
def _rope(X, COS, SIN, OUT, stride_t, out_stride_t, out_stride_h, HEADS: tl.constexpr,
          HEADS_P2: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS_P2)[:, None]
    offs = tl.arange(0, HALF)[None, :]
    inside = heads < HEADS
    src = X + t * stride_t + heads * (2 * HALF) + offs
    x1 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=inside, other=0.0).to(tl.float32)
    c = tl.load(COS + t * HALF + offs)
    s = tl.load(SIN + t * HALF + offs)
    dst = OUT + t * out_stride_t + heads * out_stride_h + offs
    tl.store(dst, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=inside)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=inside)


def apply_rope(x, cos, sin, heads, out=None):
    """prefill.apply_rope of x (T, heads x D) (rows may be strided: a slice of q/k/v), cos and
    sin (T, D / 2) float32 -> (T, heads, D) contiguous; or written into the first T rows of
    `out`, a (R >= T, heads, D) view of any strides (a bucket, or the K cache's positions),
    which is returned."""
    t = x.shape[0]
    half = cos.shape[1]
    if out is None:
        out = x.new_empty((t, heads, 2 * half))
    _rope[(t,)](x, cos, sin, out, x.stride(0), out.stride(0), out.stride(1), heads,
                triton.next_power_of_2(heads), half)
    return out


@triton.jit
def _silu_mul(GU, OUT, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < INTER
    gate = tl.load(GU + row * 2 * INTER + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(GU + row * 2 * INTER + INTER + cols, mask=inside, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * INTER + cols, (silu * up).to(OUT.dtype.element_ty), mask=inside)


def silu_mul(gate_up):
    """F.silu(gate) * up of a contiguous (T, 2I) [gate | up] tensor -> (T, I)."""
    t, two_i = gate_up.shape
    i = two_i // 2
    out = gate_up.new_empty((t, i))
    _silu_mul[(t, triton.cdiv(i, 1024))](gate_up, out, i, BLOCK=1024)
    return out


def usable(head_dim):
    """The RoPE kernel needs a power-of-two half head."""
    half = head_dim // 2
    return half & (half - 1) == 0
