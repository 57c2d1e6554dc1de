"""Launching `persistent.layer_kernel`: its config, how many programs fit, counters, scratch.

The grid is sized from the compiled kernel (registers, shared memory and warps against the
device's limits): programs beyond what fits would only queue, and fewer leave SMs idle. Progress
does not depend on it (persistent.py says why).
"""
from typing import NamedTuple, Optional

import torch
import triton

from decode_monitor.engine.fused import pdl
from decode_monitor.engine.fused.attention import _LOG2E, DecodeAttention
from decode_monitor.engine.fused.persistent import ATT_DONE, SPIN_LIMIT, layer_kernel


class PersistentConfig(NamedTuple):
    """programs_per_sm None runs as many as fit (`resident_programs`), a number at most that
    many; prefetch: 128-byte lines of each weight row that a waiting task asks L2 for (a power
    of two; 0: none); maxnreg caps registers a thread (ptxas spills the rest), since the
    attention task alone would take ~160 at 4 warps and the kernel's count is that of its
    largest task."""
    block_n: int = 8
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: Optional[int] = None
    prefetch: int = 0
    maxnreg: Optional[int] = 128
    spin: int = SPIN_LIMIT  # polls before a wait gives up
    pdl: bool = True  # launched with programmatic dependent launch where the GPU has it (pdl.py)
    block_t: int = 64  # attention: positions a step of a split's loop
    n_splits: Optional[int] = None  # attention: splits of the prefix a KV head (None: default)


# The interpreter runs programs one by one, in ticket order: every wait is met at its first poll.
INTERPRETER = PersistentConfig(64, 256, 4, 1, 2, spin=64)


def resident_programs(compiled, device):
    """Programs of this compiled kernel that fit on one SM at once: the least of what its
    registers, threads and shared memory allow (the CUDA occupancy rules; Hopper's register
    allocation unit is 256 registers a warp)."""
    compiled._init_handles()
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-compiled.n_regs * 32 // 256) * 256
    by_regs = getattr(props, 'regs_per_multiprocessor', 65536) // (regs_per_warp * warps)
    by_threads = props.max_threads_per_multi_processor // (32 * warps)
    shared = compiled.metadata.shared  # 1 KB a program is reserved by the driver
    smem = getattr(props, 'shared_memory_per_multiprocessor', 48 << 10)
    by_shared = smem // (shared + 1024) if shared else 32
    return min(by_regs, by_threads, by_shared, 32)


class PersistentLayers:
    """Scratch, counters and the launch of `layer_kernel` for one model's layers."""

    COUNTERS = 64  # int32 counters a layer (TICKET, the stages, one per KV head from ATT_DONE)

    def __init__(self, backend, config=None):
        b = self.backend = backend
        device = b.device
        self.on_cpu = device.type == 'cpu'
        self.config = config or (INTERPRETER if self.on_cpu else PersistentConfig())
        if ATT_DONE + b.kv_heads > self.COUNTERS:
            raise ValueError(f'{b.kv_heads} KV heads: at most {self.COUNTERS - ATT_DONE}')
        self.layers = len(b.layers)
        self.cnt = torch.zeros(self.layers, self.COUNTERS, dtype=torch.int32, device=device)
        self.err = torch.zeros(1, dtype=torch.int32, device=device)
        # Attention's partials: the backend's explicit attention config, else this config's
        # (a table's, tuned for the separate kernels, may want more registers than the rest)
        self.att = att = DecodeAttention(
            b.q_heads, b.kv_heads, b.head_dim, b.max_context, device, scale=b.scale,
            config=b._attention_config or (self.config.block_t, self.config.n_splits, 4, 1))
        self.hidden = b.embed.shape[1]
        self.inter = b.layers[0].wd.shape[1]
        self.block_t = att.block_t
        self.constants = dict(
            HIDDEN=self.hidden, INTER=self.inter, Q_HEADS=b.q_heads, KV_HEADS=b.kv_heads,
            HALF=b.head_dim // 2, HAS_BIAS=b.layers[0].bqkv is not None,
            N_SPLITS=att.n_splits, S_P2=att.s_p2, S_BLOCK=min(att.s_p2, att.MERGE_BLOCK),
            G_P2=att.g_p2, G_PAD=att.g_pad, BLOCK_T=att.block_t, IEEE=b.dtype == torch.float32,
            WHILE_LOOP=self.on_cpu, BN_QKV=self.config.block_n, BN_O=self.config.block_n,
            BN_GU=self.config.block_n, BN_D=self.config.block_n,
            BLOCK_K=min(self.config.block_k, triton.next_power_of_2(self.hidden)),
            PREFETCH=0 if self.on_cpu else self.config.prefetch,  # inline PTX: GPU only
            SPIN=self.config.spin, num_warps=self.config.num_warps,
            num_stages=self.config.num_stages)
        self.constants.update(pdl.launch_args(device) if self.config.pdl else {'PDL': False})
        if self.config.maxnreg and not self.on_cpu:
            self.constants['maxnreg'] = self.config.maxnreg
        self.scale_log2 = b.scale * _LOG2E
        self.tasks = self._tasks(b)
        self.per_sm = None
        if self.on_cpu:
            self.grid = (self.config.programs_per_sm or 1,)
        else:
            pos = torch.zeros(1, dtype=torch.long, device=device)
            compiled = layer_kernel.warmup(*self._args(0, pos), grid=(1,),
                                           **self.constants)
            self.per_sm = resident_programs(compiled, device)
            self.n_regs = compiled.n_regs
            self.shared = compiled.metadata.shared
            want = self.config.programs_per_sm or self.per_sm
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            self.grid = (max(1, min(want, self.per_sm) * sms),)

    def _tasks(self, b):
        c = self.constants
        pairs = (b.q_heads + 2 * b.kv_heads) * c['HALF']
        blocks = [triton.cdiv(pairs, c['BN_QKV']), b.kv_heads * c['N_SPLITS'], b.q_heads,
                  triton.cdiv(self.hidden, c['BN_O']), triton.cdiv(self.inter, c['BN_GU']),
                  triton.cdiv(self.hidden, c['BN_D'])]
        return sum(blocks)

    def _args(self, i, pos):
        b = self.backend
        layer = b.layers[i]
        k_cache, v_cache = b.k_cache[i], b.v_cache[i]
        return (layer.wqkv, layer.bqkv if layer.bqkv is not None else layer.wqkv, layer.wo,
                layer.wgu, layer.wd, layer.ln1, layer.ln2, b.h, b.q, b.att, b.act, b.cos, b.sin,
                pos, k_cache, v_cache, self.att.part_o, self.att.part_m, self.att.part_l,
                self.cnt[i], self.err, b.eps, self.scale_log2, k_cache.stride(0))

    def __call__(self, i, pos):
        """Layer i on the residual stream b.h, reading pos from device memory."""
        layer_kernel[self.grid](*self._args(i, pos), **self.constants)

    def timeouts(self):
        """Whether any wait has given up since the last reset (a host read: diagnostics)."""
        return int(self.err.item())
