"""Triton M=1 GEMV kernels for batch-1 decode, with the neighbouring element-wise work fused in.

A decode step is a chain of matrix-vector products, each streaming a weight matrix once, so the
whole step is as fast as these kernels stream HBM. Each program owns BLOCK_N output rows and
walks the full K, or with SPLIT > 1 a 1/SPLIT share of it: SPLIT programs then store their partial
sums in fp32 scratch and the last of them to finish adds them in a fixed order and runs the
epilogue (`_combine_splits`).
Splitting K puts more programs in flight where a matrix has too few row blocks to fill every SM
(the small matrices, and quantised ones, whose row blocks are larger). What runs around a GEMV
rides along in its loop or epilogue instead of costing a launch and a round trip:

- RMSNorm of the input: the sum of squares accumulates in the same loop that reads x, and
  W @ (g * x * rstd) == rstd * (W @ (g * x)), so rstd multiplies the result at the end.
- SiLU(gate) * up: gate and up rows are read by the same program, two accumulators.
- Residual add: the o_proj / down_proj output is added to the residual stream in place.
- Q/K/V: bias, RoPE and the K/V cache write at `pos` (read from device memory).
"""
import torch
import triton
import triton.language as tl

from decode_monitor.engine.fused import pdl
from decode_monitor.engine.fused.configs import DEFAULTS
from decode_monitor.engine.fused.dequant import quant_dot
from decode_monitor.engine.fused.quant import QuantWeight


@triton.jit
def _dot(W, S, Z, X, NW, rows_a, rows_b, K: tl.constexpr, stride_w, stride_s,
         NORM: tl.constexpr, PAIR: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
         STAGES: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr, PTX: tl.constexpr):
    """(W x')[rows_a], (W x')[rows_b] (zeros unless PAIR), and sum_k x[k]^2; x' = g * x if NORM.

    Sums over this program's share of K: all of it unless SPLIT > 1.

    FMT 0: W dense (N, K); 1: int8 codes, four a 32-bit word (N, K / 4), with scales S; 2: int4
    codes, eight a word (N, K / 8), with scales S and offsets Z (dequant.py). Both row sets
    share one pass over x (gate/up, RoPE's row pairs).

    Waits for the previous kernel (PDL) before reading x; the quantised loop requests its first
    chunk of weights before that wait (dequant.quant_dot).
    """
    # This program's share of K: CHUNKS chunks of BLOCK_K from lo, share program_id(1) of
    # SPLIT. A count fixed at compile time (the interpreter cannot range over program ids); the
    # last share's chunks past K are masked off (EVEN_K is False unless the shares are equal).
    CHUNKS: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT - 1) // SPLIT
    lo = tl.program_id(1) * (CHUNKS * BLOCK_K) if SPLIT > 1 else 0
    if FMT == 0:
        pdl.wait_for_previous_kernel(PDL)
        acc_a = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        wa_rows = W + rows_a.to(tl.int64)[:, None] * stride_w
        wb_rows = W + rows_b.to(tl.int64)[:, None] * stride_w
        for c in tl.range(0, CHUNKS, num_stages=STAGES):
            cols = lo + c * BLOCK_K + tl.arange(0, BLOCK_K)
            if EVEN_K:
                x = tl.load(X + cols).to(tl.float32)
                wa = tl.load(wa_rows + cols[None, :])
                if PAIR:
                    wb = tl.load(wb_rows + cols[None, :])
            else:
                kmask = cols < K
                x = tl.load(X + cols, mask=kmask, other=0.0).to(tl.float32)
                wa = tl.load(wa_rows + cols[None, :], mask=kmask[None, :], other=0.0)
                if PAIR:
                    wb = tl.load(wb_rows + cols[None, :], mask=kmask[None, :], other=0.0)
            if NORM:
                ss += x * x
                if EVEN_K:
                    x = x * tl.load(NW + cols).to(tl.float32)
                else:
                    x = x * tl.load(NW + cols, mask=kmask, other=0.0).to(tl.float32)
            acc_a += wa.to(tl.float32) * x[None, :]
            if PAIR:
                acc_b += wb.to(tl.float32) * x[None, :]
        dot_a, dot_b, sum_sq = tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1), tl.sum(ss, axis=0)
    else:
        dot_a, dot_b, sum_sq = quant_dot(W, S, Z, X, NW, rows_a, rows_b, lo, CHUNKS, K, stride_w,
                                         stride_s, NORM, PAIR, FMT == 2, GROUP, BLOCK_N, BLOCK_K,
                                         EVEN_K, STAGES, PDL, PTX)
    return dot_a, dot_b, sum_sq  # one exit: Triton traces on past a return inside an if


@triton.jit
def _combine_splits(ACC, SSQ, CNT, rows_a, rows_b, mask, dot_a, dot_b, sum_sq, acc_rows,
                    PAIR: tl.constexpr, NORM: tl.constexpr, SPLIT: tl.constexpr):
    """Split-K: store this program's partial sums in its own fp32 slots; the last of the SPLIT
    programs of this row block to arrive (a ticket) adds all SPLIT partials in split order and
    returns last = True. The others get their own partials and must not store.

    A fixed order, not atomic adds, so a step repeats bit for bit. Every slot is written before
    it is read in the same launch, so the scratch needs no zeroing; the last program resets the
    ticket for the next launch (graph replays included).
    ACC: SPLIT slots of acc_rows (the rows of W); SSQ: SPLIT per row block; CNT: one ticket per
    row block (program_id(0)).
    """
    block = tl.program_id(0)
    share = tl.program_id(1)
    tl.store(ACC + share * acc_rows + rows_a, dot_a, mask=mask)
    if PAIR:
        tl.store(ACC + share * acc_rows + rows_b, dot_b, mask=mask)
    if NORM:
        tl.store(SSQ + share * tl.num_programs(0) + block, sum_sq)
    tl.debug_barrier()  # every thread's partial is stored before the ticket is taken
    last = tl.atomic_add(CNT + block, 1, sem='acq_rel') == SPLIT - 1
    if last:
        dot_a = tl.load(ACC + rows_a, mask=mask, other=0.0, cache_modifier='.cg')
        if PAIR:
            dot_b = tl.load(ACC + rows_b, mask=mask, other=0.0, cache_modifier='.cg')
        if NORM:
            sum_sq = tl.load(SSQ + block, cache_modifier='.cg')
        for i in tl.static_range(1, SPLIT):
            dot_a += tl.load(ACC + i * acc_rows + rows_a, mask=mask, other=0.0,
                             cache_modifier='.cg')
            if PAIR:
                dot_b += tl.load(ACC + i * acc_rows + rows_b, mask=mask, other=0.0,
                                 cache_modifier='.cg')
            if NORM:
                sum_sq += tl.load(SSQ + i * tl.num_programs(0) + block, cache_modifier='.cg')
        tl.atomic_xchg(CNT + block, 0)
    return dot_a, dot_b, sum_sq, last


@triton.jit
def gemv_kernel(W, S, Z, X, NW, R, Y, ACC, SSQ, CNT, N, K: tl.constexpr, stride_w, stride_s,
                eps, NORM: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr,
                FMT: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                STAGES: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
                PTX: tl.constexpr):
    """Y[n] = (W @ rmsnorm(x))[n] (+ R[n]); GATED: W is [gate; up] (2N, K), Y = silu(g) * u.

    Y may alias R (residual add in place): each program reads and writes only its own rows.
    ACC, SSQ, CNT: split-K scratch (`_combine_splits`), tickets zeroed; unused when SPLIT == 1.
    """
    pid = tl.program_id(0)  # no memory is touched before _dot waits for the previous kernel
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1)  # clamped tail rows load valid memory; their store is masked
    store = row_mask
    if GATED:
        g, u, ss = _dot(W, S, Z, X, NW, rows, rows + N, K, stride_w, stride_s,
                        NORM, True, FMT, GROUP, BLOCK_N, BLOCK_K, EVEN_K, STAGES, SPLIT, PDL,
                        PTX)
        pdl.allow_next_kernel(PDL)  # the weights are streamed (pdl.py: why not earlier)
        if SPLIT > 1:
            g, u, ss, last = _combine_splits(ACC, SSQ, CNT, rows, rows + N, row_mask, g, u, ss,
                                             2 * N, True, NORM, SPLIT)
            store = row_mask & last
        if NORM:
            rstd = tl.rsqrt(ss / K + eps)
            g = g * rstd
            u = u * rstd
        y = g * tl.sigmoid(g) * u
    else:
        y, _, ss = _dot(W, S, Z, X, NW, rows, rows, K, stride_w, stride_s,
                        NORM, False, FMT, GROUP, BLOCK_N, BLOCK_K, EVEN_K, STAGES, SPLIT, PDL,
                        PTX)
        pdl.allow_next_kernel(PDL)
        if SPLIT > 1:
            y, _, ss, last = _combine_splits(ACC, SSQ, CNT, rows, rows, row_mask, y, y, ss,
                                             N, False, NORM, SPLIT)
            store = row_mask & last
        if NORM:
            y = y * tl.rsqrt(ss / K + eps)
    if RESIDUAL:
        y += tl.load(R + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=store)


@triton.jit
def _qkv_rope_store(a, b, ss, p, p_mask, j, rows_a, rows_b, B, COS, SIN, POS, Q, KC, VC, eps,
                    q_pairs, k_pairs, cache_head_stride, K: tl.constexpr, HALF: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    """The end of a block of qkv row pairs (a, b: the halves' dot products, ss: the sum of x²):
    RMSNorm's scale, the bias, RoPE on q and k, q to Q, k and v to the cache at pos.
    Shared with the persistent kernel's qkv task and staged_qkv.py's Gluon kernel (inlined: the
    same operations in each)."""
    rstd = tl.rsqrt(ss / K + eps)
    a = a * rstd
    b = b * rstd
    if HAS_BIAS:
        a += tl.load(B + rows_a).to(tl.float32)
        b += tl.load(B + rows_b).to(tl.float32)
    pos = tl.load(POS)
    c = tl.load(COS + pos * HALF + j)
    s = tl.load(SIN + pos * HALF + j)
    is_q = p < q_pairs
    is_k = (p >= q_pairs) & (p < q_pairs + k_pairs)
    is_v = p >= q_pairs + k_pairs
    ra = tl.where(is_v, a, a * c - b * s)
    rb = tl.where(is_v, b, b * c + a * s)
    tl.store(Q + rows_a, ra.to(Q.dtype.element_ty), mask=p_mask & is_q)
    tl.store(Q + rows_b, rb.to(Q.dtype.element_ty), mask=p_mask & is_q)
    kv_pair = tl.where(is_k, p - q_pairs, p - q_pairs - k_pairs)  # pair index within K or V
    slot = (kv_pair // HALF) * cache_head_stride + pos * (2 * HALF) + kv_pair % HALF
    tl.store(KC + slot, ra.to(KC.dtype.element_ty), mask=p_mask & is_k)
    tl.store(KC + slot + HALF, rb.to(KC.dtype.element_ty), mask=p_mask & is_k)
    tl.store(VC + slot, ra.to(VC.dtype.element_ty), mask=p_mask & is_v)
    tl.store(VC + slot + HALF, rb.to(VC.dtype.element_ty), mask=p_mask & is_v)


@triton.jit
def qkv_rope_kernel(W, S, Z, B, X, NW, COS, SIN, POS, Q, KC, VC, ACC, SSQ, CNT,
                    K: tl.constexpr, stride_w, stride_s, eps, n_pairs, q_pairs, k_pairs,
                    cache_head_stride, HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
                    FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
                    SPLIT: tl.constexpr, PDL: tl.constexpr, PTX: tl.constexpr):
    """rmsnorm -> [q; k; v] = Wqkv x (+ b) -> RoPE on q, k -> q to Q, k and v to the cache at pos.

    Rows are taken in rotate-half pairs (j, j + HALF) of each head, so both halves of a RoPE
    rotation land in the same program. V heads pass through unrotated.
    Q: (q_heads * 2 HALF,); KC, VC: (kv_heads, max_context, 2 HALF) of this layer.
    """
    pid = tl.program_id(0)  # no memory is touched before _dot waits for the previous kernel
    p = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # pair index over all heads
    p_mask = p < n_pairs
    p = tl.minimum(p, n_pairs - 1)
    head = p // HALF
    j = p % HALF
    rows_a = head * (2 * HALF) + j
    rows_b = rows_a + HALF
    a, b, ss = _dot(W, S, Z, X, NW, rows_a, rows_b, K, stride_w, stride_s,
                    True, True, FMT, GROUP, BLOCK_N, BLOCK_K, EVEN_K, STAGES, SPLIT, PDL, PTX)
    pdl.allow_next_kernel(PDL)
    if SPLIT > 1:
        a, b, ss, last = _combine_splits(ACC, SSQ, CNT, rows_a, rows_b, p_mask, a, b, ss,
                                         2 * n_pairs, True, True, SPLIT)
        p_mask = p_mask & last
    _qkv_rope_store(a, b, ss, p, p_mask, j, rows_a, rows_b, B, COS, SIN, POS, Q, KC, VC, eps,
                    q_pairs, k_pairs, cache_head_stride, K, HALF, HAS_BIAS)


# -- launch wrappers ------------------------------------------------------------------------------
_FMT_CODES = {'bf16': 0, 'int8': 1, 'int4': 2}


def _ptx():
    """Whether the kernels compile to PTX (inline assembly allowed): not under Triton's CPU
    interpreter, whose kernels are not JITFunctions."""
    return isinstance(gemv_kernel, triton.runtime.JITFunction)


def _weight_args(w):
    """(W, S, Z, stride_w, stride_s, fmt name, FMT, GROUP) of a dense tensor or a QuantWeight."""
    if isinstance(w, QuantWeight):
        offset = w.offset if w.offset is not None else w.scale
        codes = w.q.view(torch.int32)  # the kernels read whole 32-bit words of codes
        return (codes, w.scale, offset, codes.stride(0), w.scale.stride(0), w.fmt,
                _FMT_CODES[w.fmt], w.group)
    return w, w, w, w.stride(0), 0, 'bf16', 0, 1


def _split_config(config, k, group):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT) of a 4- to 6-tuple config; BLOCK_K at
    least a group, SPLIT at most the number of BLOCK_K chunks."""
    block_n, block_k, warps, stages, *rest = config
    block_k = max(block_k, group)
    split = min(rest[0] if rest else 1, triton.cdiv(k, block_k))
    return block_n, block_k, warps, stages, split


def _register_cap(config):
    """The launch's `maxnreg` keyword where the config caps registers (GemvConfig)."""
    cap = config[5] if len(config) > 5 else None
    return {'maxnreg': cap} if cap else {}


def _even(k, block_k, split):
    """No masks needed: K is whole chunks, shared equally by the splits."""
    chunks = k // block_k
    return k % block_k == 0 and chunks % split == 0


_SCRATCH = {}  # device -> (acc, ssq, cnt) of split-K; grown, never shrunk
_OUTGROWN = []  # earlier, smaller scratch: a captured graph may still point at it


def _split_scratch(device, rows, blocks, split):
    """fp32 slots for `split` partial sums of `rows` rows of W and of `blocks` row blocks, and
    the blocks' tickets (zeroed).

    Shared by every split GEMV on the device: each launch writes every slot it reads and resets
    its tickets, and the kernels of one decode step run one after another on one stream.
    """
    acc, ssq, cnt = _SCRATCH.get(device, (None, None, None))
    if acc is None or acc.numel() < split * rows or ssq.numel() < split * blocks \
            or cnt.numel() < blocks:
        if acc is not None:
            _OUTGROWN.append((acc, ssq, cnt))
        slots = max(split * rows, 0 if acc is None else acc.numel())
        block_slots = max(split * blocks, 0 if ssq is None else ssq.numel())
        blocks = max(blocks, 0 if cnt is None else cnt.numel())
        acc = torch.zeros(slots, dtype=torch.float32, device=device)
        ssq = torch.zeros(block_slots, dtype=torch.float32, device=device)
        cnt = torch.zeros(blocks, dtype=torch.int32, device=device)
        _SCRATCH[device] = (acc, ssq, cnt)
    return acc, ssq, cnt


def staged_fits(config, fmt, n, k, group, plain=False):
    """Whether staged.py's kernels (staged_qkv.py's for q/k/v) take this shape at `config`: a
    `staged` int8 or int4 row, a
    Triton with Gluon, a shape it fits (plain: no RMSNorm and no gate, so K may be split)."""
    if not getattr(config, 'staged', False) or fmt == 'bf16':
        return False
    try:
        from decode_monitor.engine.fused import staged
    except ImportError:  # a Triton without Gluon
        return False
    return staged.fits(config, fmt, n, k, group, plain)


def _staged(config, x, fmt, n, k, group, plain=False):
    """Whether a `staged` config runs the kernel of staged.py (or staged_qkv.py) here: on a
    GPU (Gluon compiles for CUDA only, not under the interpreter) for a shape it takes; else the
    Triton kernel."""
    return x.is_cuda and _ptx() and staged_fits(config, fmt, n, k, group, plain)


def gemv(w, x, out, norm_weight=None, residual=None, gated=False, eps=0.0, config=None,
         kind=None):
    """out (N,) = W (N or 2N, K) @ rmsnorm(x (K,)) [+ residual (N,)]; see gemv_kernel.

    w: a dense tensor or a QuantWeight (int8 / int4, dequantised in the kernel).
    """
    n = out.shape[0]
    k = x.shape[0]
    kind = kind or ('gated' if gated else 'gemv')
    W, S, Z, stride_w, stride_s, fmt, fmt_code, group = _weight_args(w)
    config = config or DEFAULTS.gemv(kind, n, k, fmt, x.device.type == 'cpu')
    norm = norm_weight is not None
    if _staged(config, x, fmt, n, k, group, not (norm or gated)):
        from decode_monitor.engine.fused import staged
        acc, _, cnt = _split_scratch(x.device, n, triton.cdiv(n, config.block_n),
                                     config.split_k) if config.split_k > 1 else (None,) * 3
        return staged.gemv(w, x, out, norm_weight, residual, gated, eps, config, acc, cnt)
    block_n, block_k, warps, stages, split = _split_config(config, k, group)
    res = residual is not None
    grid = (triton.cdiv(n, block_n), split)
    acc, ssq, cnt = _split_scratch(x.device, (2 if gated else 1) * n, grid[0], split) \
        if split > 1 else (out, out, out)
    gemv_kernel[grid](W, S, Z, x, norm_weight if norm else x, residual if res else out, out,
                      acc, ssq, cnt, n, k, stride_w, stride_s, eps, NORM=norm, RESIDUAL=res,
                      GATED=gated, FMT=fmt_code, GROUP=group, BLOCK_N=block_n,
                      BLOCK_K=block_k, EVEN_K=_even(k, block_k, split), STAGES=stages, SPLIT=split,
                      PTX=_ptx(), num_warps=warps, **_register_cap(config),
                      **pdl.launch_args(x.device))
    return out


def qkv_rope(w, bias, x, norm_weight, cos, sin, pos, q, k_cache, v_cache, q_heads, kv_heads,
             eps, config=None):
    """One layer's QKV projection with RoPE; writes q and the cache row at device-side pos.

    cos, sin: (max_context, head_dim / 2) fp32 tables; k_cache, v_cache: (kv_heads, T, head_dim).
    """
    head_dim = k_cache.shape[-1]
    half = head_dim // 2
    kdim = x.shape[0]
    n_pairs = (q_heads + 2 * kv_heads) * half
    on_cpu = x.device.type == 'cpu'
    W, S, Z, stride_w, stride_s, fmt, fmt_code, group = _weight_args(w)
    config = config or DEFAULTS.gemv('qkv', 2 * n_pairs, kdim, fmt, on_cpu)
    if _staged(config, x, fmt, 2 * n_pairs, kdim, group):
        from decode_monitor.engine.fused import staged_qkv
        staged_qkv.qkv_rope(w, bias, x, norm_weight, cos, sin, pos, q, k_cache, v_cache,
                            q_heads, kv_heads, eps, config)
        return
    block_n, block_k, warps, stages, split = _split_config(config, kdim, group)
    grid = (triton.cdiv(n_pairs, block_n), split)
    acc, ssq, cnt = _split_scratch(x.device, 2 * n_pairs, grid[0], split) if split > 1 \
        else (q, q, q)
    qkv_rope_kernel[grid](W, S, Z, bias if bias is not None else W, x, norm_weight, cos, sin,
                          pos, q, k_cache, v_cache, acc, ssq, cnt, kdim, stride_w, stride_s,
                          eps, n_pairs, q_heads * half, kv_heads * half, k_cache.stride(0),
                          HALF=half, HAS_BIAS=bias is not None, FMT=fmt_code, GROUP=group,
                          BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=_even(kdim, block_k, split),
                          STAGES=stages, SPLIT=split, PTX=_ptx(), num_warps=warps,
                          **_register_cap(config), **pdl.launch_args(x.device))
