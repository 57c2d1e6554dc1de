"""Split-K (flash-decoding) GQA attention for one query token, valid prefix only.

Pass 1, grid (kv_heads, n_splits): program (h, s) reads the K/V rows of KV head h in its share
of the valid prefix 0..pos (pos read from device memory, so one captured graph serves every
position) and attends with all G query heads of that group at once: K/V are read once per KV
head and repeated heads are never materialised. Each program leaves an unnormalised partial
(acc, max, sum). Pass 2, grid (q_heads,): each query head merges its partials.

Two launches, not one: merging in the last program of each head to finish (a ticket counter)
saves a launch but puts a device-wide atomic and the whole merge of a KV head into one program.
In the graphed step on an H100 (qwen2.5-7b, ctx 2048) that took 9.5 us a layer, the two passes
6.5 us (benchmarks/NOTES.md, row 21).
"""
import torch
import triton
import triton.language as tl

from decode_monitor.engine.fused import pdl
from decode_monitor.engine.fused.configs import DEFAULTS

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(q, k_head, v_head, t0, end, m, l_sum, acc, scale_log2,
                  D: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update of (m, l_sum, acc) with positions t0..t0+BLOCK_T (< end)."""
    t = t0 + tl.arange(0, BLOCK_T)
    t_mask = t < end
    d = tl.arange(0, D)
    k = tl.load(k_head + t[:, None] * D + d[None, :], mask=t_mask[:, None], other=0.0)
    v = tl.load(v_head + t[:, None] * D + d[None, :], mask=t_mask[:, None], other=0.0)
    if IEEE:  # fp32 caches: exact products, not TF32
        scores = tl.dot(q, tl.trans(k), input_precision='ieee')
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = tl.where(t_mask[None, :], scores * scale_log2, float('-inf'))  # (G_PAD, BLOCK_T)
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision='ieee')
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_sum * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv


@triton.jit
def attention_split_kernel(Q, KC, VC, POS, PART_O, PART_M, PART_L, cache_head_stride,
                           scale_log2, N_SPLITS: tl.constexpr, G: tl.constexpr,
                           G_P2: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                           BLOCK_T: tl.constexpr, STAGES: tl.constexpr, IEEE: tl.constexpr,
                           WHILE_LOOP: tl.constexpr, PDL: tl.constexpr):
    """Pass 1, grid (kv_heads, N_SPLITS): the unnormalised partial (acc, max, sum) of the G
    query heads of KV head h over split s of the valid prefix."""
    pdl.await_previous_kernel(PDL)
    h = tl.program_id(0)
    sid = tl.program_id(1)
    length = tl.load(POS).to(tl.int32) + 1
    chunk = tl.cdiv(tl.cdiv(length, N_SPLITS), BLOCK_T) * BLOCK_T
    start = sid * chunk
    end = tl.minimum(start + chunk, length)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    q = tl.load(Q + (h * G + g)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
    k_head = KC + h * cache_head_stride
    v_head = VC + h * cache_head_stride
    m = tl.full((G_PAD,), float('-inf'), dtype=tl.float32)
    l_sum = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    if WHILE_LOOP:  # the CPU interpreter cannot iterate a range with bounds read from memory
        t0 = start
        while t0 < end:
            m, l_sum, acc = _attend_block(q, k_head, v_head, t0, end, m, l_sum, acc,
                                          scale_log2, D, BLOCK_T, IEEE)
            t0 += BLOCK_T
    else:  # a range loop, so K/V loads are software-pipelined STAGES deep
        for t0 in tl.range(start, end, BLOCK_T, num_stages=STAGES):
            m, l_sum, acc = _attend_block(q, k_head, v_head, t0, end, m, l_sum, acc,
                                          scale_log2, D, BLOCK_T, IEEE)
    # Partials keep the G_P2 real (and padding) rows of the G_PAD the dots needed; a split past
    # the prefix leaves (0, -inf, 0), which the merge weighs 0.
    part = h * N_SPLITS + sid
    keep = g < G_P2
    tl.store(PART_O + (part * G_P2 + g)[:, None] * D + d[None, :], acc, mask=keep[:, None])
    tl.store(PART_M + part * G_P2 + g, m, mask=keep)
    tl.store(PART_L + part * G_P2 + g, l_sum, mask=keep)


@triton.jit
def attention_merge_kernel(PART_O, PART_M, PART_L, OUT, N_SPLITS: tl.constexpr,
                           S_P2: tl.constexpr, S_BLOCK: tl.constexpr, G: tl.constexpr,
                           G_P2: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    """Pass 2, grid (q_heads,): softmax-weighted sum of query head (h, r)'s partials."""
    pdl.await_previous_kernel(PDL)
    qh = tl.program_id(0)
    first = (qh // G) * N_SPLITS  # the partials of its KV head
    r = qh % G
    d = tl.arange(0, D)
    s = tl.arange(0, S_P2)
    s_mask = s < N_SPLITS
    m_s = tl.load(PART_M + (first + s) * G_P2 + r, mask=s_mask, other=float('-inf'))
    l_s = tl.load(PART_L + (first + s) * G_P2 + r, mask=s_mask, other=0.0)
    m_all = tl.max(m_s, axis=0)  # finite: split 0 always holds position 0
    den = tl.sum(tl.exp2(m_s - m_all) * l_s, axis=0)  # empty splits weigh 0
    out = tl.zeros((D,), dtype=tl.float32)
    for s0 in tl.static_range(0, S_P2, S_BLOCK):  # S_BLOCK rows of D at a time in registers
        sb = s0 + tl.arange(0, S_BLOCK)
        sb_mask = sb < N_SPLITS
        w = tl.exp2(tl.load(PART_M + (first + sb) * G_P2 + r, mask=sb_mask,
                            other=float('-inf')) - m_all)
        o = tl.load(PART_O + ((first + sb) * G_P2 + r)[:, None] * D + d[None, :],
                    mask=sb_mask[:, None], other=0.0)
        out += tl.sum(w[:, None] * o, axis=0)
    tl.store(OUT + qh * D + d, (out / den).to(OUT.dtype.element_ty))


class DecodeAttention:
    """Scratch (partials) for one model's layers, which run one after another."""

    MERGE_BLOCK = 16  # splits a merge program holds in registers at once

    def __init__(self, q_heads, kv_heads, head_dim, max_context, device, scale=None,
                 config=None):
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise ValueError(f'head_dim must be a power of two >= 16, not {head_dim}')
        self.q_heads = q_heads
        self.group = q_heads // kv_heads
        self.g_p2 = triton.next_power_of_2(self.group)
        self.g_pad = max(16, self.g_p2)  # tl.dot needs M >= 16
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        block_t, n_splits, self.num_warps, self.num_stages = (
            config or DEFAULTS.attention(kv_heads, self.group, max_context))
        self.block_t = block_t
        self.n_splits = n_splits or default_splits(kv_heads, max_context, block_t, device)
        parts = kv_heads * self.n_splits * self.g_p2
        self.part_o = torch.empty(parts * head_dim, dtype=torch.float32, device=device)
        self.part_m = torch.empty(parts, dtype=torch.float32, device=device)
        self.part_l = torch.empty(parts, dtype=torch.float32, device=device)
        self.s_p2 = triton.next_power_of_2(self.n_splits)

    def __call__(self, q, k_cache, v_cache, pos, out):
        """q (q_heads D,); k_cache, v_cache (kv_heads, T, D); pos (1,) -> out (q_heads D,)."""
        launch = pdl.launch_args(q.device)
        attention_split_kernel[(self.kv_heads, self.n_splits)](
            q, k_cache, v_cache, pos, self.part_o, self.part_m, self.part_l,
            k_cache.stride(0), self.scale * _LOG2E, N_SPLITS=self.n_splits, G=self.group,
            G_P2=self.g_p2, G_PAD=self.g_pad, D=self.head_dim, BLOCK_T=self.block_t,
            STAGES=self.num_stages, IEEE=q.dtype == torch.float32,
            WHILE_LOOP=q.device.type == 'cpu', num_warps=self.num_warps, **launch)
        attention_merge_kernel[(self.q_heads,)](
            self.part_o, self.part_m, self.part_l, out, N_SPLITS=self.n_splits, S_P2=self.s_p2,
            S_BLOCK=min(self.s_p2, self.MERGE_BLOCK), G=self.group, G_P2=self.g_p2,
            D=self.head_dim, num_warps=4, **launch)
        return out


def default_splits(kv_heads, max_context, block_t, device):
    """About two programs per SM, and no more splits than blocks of the longest context."""
    sms = 132
    if torch.device(device).type == 'cuda':
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, kv_heads), triton.cdiv(max_context, block_t)))
