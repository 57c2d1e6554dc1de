"""Split-K (flash-decoding) GQA attention for one query token, valid prefix only.

Grid (kv_heads, n_splits). Program (h, s) reads the K/V rows of KV head h in its share of the
valid prefix 0..pos (pos read from device memory, so one captured graph serves every position)
and attends with all G query heads of that group at once: K/V are read once per KV head and
repeated heads are never materialised. Each program leaves an unnormalised partial (acc, max,
sum); the last program of a head to finish (a ticket counter) merges the partials and writes the
output, so the merge costs no extra launch. The last program also resets the counter, which
keeps the kernel replayable inside a CUDA graph.
"""
import torch
import triton
import triton.language as tl

from decode_monitor.engine.fused import pdl
from decode_monitor.engine.fused.configs import attention_config

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
def decode_attention_kernel(Q, KC, VC, POS, PART_O, PART_M, PART_L, COUNTER, OUT,
                            cache_head_stride, scale_log2, N_SPLITS: tl.constexpr,
                            S_P2: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr,
                            G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                            STAGES: tl.constexpr, IEEE: tl.constexpr,
                            WHILE_LOOP: tl.constexpr, PDL: tl.constexpr):
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
    # Partials keep the G_P2 real (and padding) rows of the G_PAD the dots needed.
    part = h * N_SPLITS + sid
    keep = g < G_P2
    tl.store(PART_O + (part * G_P2 + g)[:, None] * D + d[None, :], acc, mask=keep[:, None])
    tl.store(PART_M + part * G_P2 + g, m, mask=keep)
    tl.store(PART_L + part * G_P2 + g, l_sum, mask=keep)
    tl.debug_barrier()  # every thread's partial is written before the ticket is taken
    ticket = tl.atomic_add(COUNTER + h, 1, sem='acq_rel')
    if ticket == N_SPLITS - 1:
        first = h * N_SPLITS
        r = tl.arange(0, G_P2)
        s = tl.arange(0, S_P2)
        ml_off = (first + s)[:, None] * G_P2 + r[None, :]  # (S_P2, G_P2)
        s_mask = (s < N_SPLITS)[:, None]
        m_s = tl.load(PART_M + ml_off, mask=s_mask, other=float('-inf'), cache_modifier='.cg')
        l_s = tl.load(PART_L + ml_off, mask=s_mask, other=0.0, cache_modifier='.cg')
        m_all = tl.max(m_s, axis=0)  # finite: split 0 always holds position 0
        den = tl.sum(tl.exp2(m_s - m_all[None, :]) * l_s, axis=0)  # empty splits weigh 0
        out = tl.zeros((G_P2, D), dtype=tl.float32)
        for i in tl.static_range(N_SPLITS):  # unrolled: all partial loads in flight at once
            w = tl.exp2(tl.load(PART_M + (first + i) * G_P2 + r, cache_modifier='.cg') - m_all)
            o = tl.load(PART_O + ((first + i) * G_P2 + r)[:, None] * D + d[None, :],
                        cache_modifier='.cg')
            out += w[:, None] * o
        out = out / den[:, None]
        tl.store(OUT + (h * G + r)[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=(r < G)[:, None])
        tl.atomic_xchg(COUNTER + h, 0)


class DecodeAttention:
    """Scratch (partials, tickets) for one model's layers, which run one after another."""

    def __init__(self, q_heads, kv_heads, head_dim, max_context, device, scale=None,
                 config=None):
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise ValueError(f'head_dim must be a power of two >= 16, not {head_dim}')
        self.group = q_heads // kv_heads
        self.g_p2 = triton.next_power_of_2(self.group)
        self.g_pad = max(16, self.g_p2)  # tl.dot needs M >= 16
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        block_t, n_splits, self.num_warps, self.num_stages = (
            config or attention_config(kv_heads, self.group, max_context))
        self.block_t = block_t
        self.n_splits = n_splits or default_splits(kv_heads, max_context, block_t, device)
        parts = kv_heads * self.n_splits * self.g_p2
        self.part_o = torch.empty(parts * head_dim, dtype=torch.float32, device=device)
        self.part_m = torch.empty(parts, dtype=torch.float32, device=device)
        self.part_l = torch.empty(parts, dtype=torch.float32, device=device)
        self.counter = torch.zeros(kv_heads, dtype=torch.int32, device=device)

    def __call__(self, q, k_cache, v_cache, pos, out):
        """q (q_heads D,); k_cache, v_cache (kv_heads, T, D); pos (1,) -> out (q_heads D,)."""
        grid = (self.kv_heads, self.n_splits)
        decode_attention_kernel[grid](
            q, k_cache, v_cache, pos, self.part_o, self.part_m, self.part_l, self.counter, out,
            k_cache.stride(0), self.scale * _LOG2E, N_SPLITS=self.n_splits,
            S_P2=triton.next_power_of_2(self.n_splits), G=self.group, G_P2=self.g_p2,
            G_PAD=self.g_pad, D=self.head_dim, BLOCK_T=self.block_t, STAGES=self.num_stages,
            IEEE=q.dtype == torch.float32, WHILE_LOOP=q.device.type == 'cpu',
            num_warps=self.num_warps, **pdl.launch_args(q.device))
        return out


def default_splits(kv_heads, max_context, block_t, device):
    """About two programs per SM, and no more splits than blocks of the longest context."""
    sms = 132
    if torch.device(device).type == 'cuda':
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, kv_heads), triton.cdiv(max_context, block_t)))
