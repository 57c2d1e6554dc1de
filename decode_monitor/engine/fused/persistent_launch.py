"""Launching `persistent.layer_kernel`: the layout of a layer, tickets, grid, counters, scratch.

Layouts (`PersistentConfig.layout`):
- 'one': the whole layer is one launch;
- 'two': q/k/v, attention and merge in one launch, o_proj, gate/up and down in a second,
  compiled without the attention task, so with the registers of a GEMV and more programs an SM;
- 'split' (the default, the fastest measured: benchmarks/NOTES.md): q/k/v in one launch, the
  separate attention kernels (attention.py, with the backend's attention config), o_proj..down
  in a second.

Each launch's grid is sized from its compiled kernel (registers, shared memory and warps against
the device's limits): programs beyond what fits would only queue, and fewer leave SMs idle.
Progress does not depend on it (persistent.py says why). Tickets: a matrix of N row blocks is
cut into ranges of up to `ticket_blocks` blocks, at least two a program of the grid, and its
last `tail` x grid blocks are single tickets.
"""
from typing import NamedTuple, Optional

import torch
import triton

from decode_monitor.engine.fused import pdl
from decode_monitor.engine.fused.gemv import _ptx, _weight_args
from decode_monitor.engine.fused.model import MATRICES
from decode_monitor.engine.fused.attention import _LOG2E, DecodeAttention
from decode_monitor.engine.fused.persistent import (ATT_DONE, SPIN_LIMIT, TICKET, TICKET_MLP,
                                                    layer_kernel)

LAYOUTS = {'one': ((1, 1, 1),), 'two': ((1, 1, 0), (0, 0, 1)), 'split': ((1, 0, 0), (0, 0, 1))}


class PersistentConfig(NamedTuple):
    """programs_per_sm None runs as many as fit (`resident_programs`), a number at most that
    many. maxnreg caps registers a thread in a launch that holds the attention task (it alone
    would take ~160 at 4 warps, and a kernel's count is that of its largest task; ptxas spills
    the rest); gemv_maxnreg in one that does not (None: uncapped). ticket_blocks: the most row
    blocks a ticket; tail: single-block tickets at the end of each matrix, per program; ahead:
    a program takes its next ticket before running the current one."""
    block_n: int = 4
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 4
    programs_per_sm: Optional[int] = None
    maxnreg: Optional[int] = 128
    spin: int = SPIN_LIMIT  # polls before a wait gives up
    pdl: bool = True  # launched with programmatic dependent launch where the GPU has it (pdl.py)
    block_t: int = 64  # attention: positions a step of a split's loop
    n_splits: Optional[int] = None  # attention: splits of the prefix a KV head (None: default)
    layout: str = 'split'
    gemv_maxnreg: Optional[int] = None
    ticket_blocks: int = 4
    tail: float = 1.0
    ahead: bool = True
    att_stages: int = 2  # the attention task's loop (num_stages: the matrices' loops)


# The interpreter runs programs one by one, in ticket order: every wait is met at its first poll.
INTERPRETER = PersistentConfig(64, 256, 4, 1, 2, spin=64, layout='one', ticket_blocks=1)
# Codes: more weights a chunk. A chunk of 4 x 512 int4 codes is a quarter of a bf16 chunk's
# bytes, and with so few bytes in flight the matrices' loops wait on memory.
CODES = {1: PersistentConfig(block_n=16), 2: PersistentConfig(block_n=16, block_k=1024)}


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


def ticket_ranges(blocks, programs, ticket_blocks, tail):
    """(R, BIG): BIG tickets of R blocks, then one a block, for a matrix of `blocks` row blocks
    on `programs` programs: R at most ticket_blocks and small enough for two tickets a program,
    and the last round(tail * programs) blocks single."""
    rb = max(1, min(ticket_blocks, blocks // (2 * programs)))
    if rb == 1:
        return 1, 0
    singles = min(blocks, round(tail * programs))
    return rb, (blocks - singles) // rb


class Part(NamedTuple):
    """One launch of a layer: its constexprs, grid and what its compiled kernel takes."""
    constants: dict
    grid: tuple
    per_sm: Optional[int]
    n_regs: Optional[int]
    shared: Optional[int]
    tickets: int


class PersistentLayers:
    """Scratch, counters and the launches of `layer_kernel` for one model's layers."""

    COUNTERS = 64  # int32 counters a layer (tickets, the stages, one per KV head from ATT_DONE)

    def __init__(self, backend, config=None):
        b = self.backend = backend
        device = b.device
        self.on_cpu = device.type == 'cpu'
        weights = [_weight_args(getattr(b.layers[0], name)) for name in MATRICES]
        fmt = weights[0][6]  # FMT: 0 dense, 1 int8, 2 int4 (the same for every matrix)
        c = self.config = config or (INTERPRETER if self.on_cpu
                                     else CODES.get(fmt, PersistentConfig()))
        if c.layout not in LAYOUTS:
            raise ValueError(f'layout {c.layout!r}: one of {sorted(LAYOUTS)}')
        if int(ATT_DONE) + b.kv_heads > self.COUNTERS:
            raise ValueError(f'{b.kv_heads} KV heads: at most {self.COUNTERS - int(ATT_DONE)}')
        self.layers = len(b.layers)
        self.cnt = torch.zeros(self.layers, self.COUNTERS, dtype=torch.int32, device=device)
        self.err = torch.zeros(1, dtype=torch.int32, device=device)
        # Attention's partials: the backend's explicit attention config, else this config's
        # (a table's, tuned for the separate kernels, may want more registers than the rest)
        self.att = att = DecodeAttention(
            b.q_heads, b.kv_heads, b.head_dim, b.max_context, device, scale=b.scale,
            config=b._attention_config or (c.block_t, c.n_splits, 4, 1))
        self.hidden = b.embed.shape[1]
        self.inter = b.layers[0].wd.shape[1]
        half = b.head_dim // 2
        self._layer_args = None  # (before pos, after pos) a layer: `_args`
        groups = [w[7] for w in weights]
        block_k = max(min(c.block_k, triton.next_power_of_2(self.hidden)), *groups)
        self.blocks = dict(QKV=triton.cdiv((b.q_heads + 2 * b.kv_heads) * half, c.block_n),
                           O=triton.cdiv(self.hidden, c.block_n),
                           GU=triton.cdiv(self.inter, c.block_n),
                           D=triton.cdiv(self.hidden, c.block_n))
        self.common = dict(
            HIDDEN=self.hidden, INTER=self.inter, Q_HEADS=b.q_heads, KV_HEADS=b.kv_heads,
            HALF=half, HAS_BIAS=b.layers[0].bqkv is not None,
            N_SPLITS=att.n_splits, S_P2=att.s_p2, S_BLOCK=min(att.s_p2, att.MERGE_BLOCK),
            G_P2=att.g_p2, G_PAD=att.g_pad, BLOCK_T=att.block_t, IEEE=b.dtype == torch.float32,
            WHILE_LOOP=self.on_cpu, BN=c.block_n, BLOCK_K=block_k, AHEAD=c.ahead,
            FMT=fmt, SUBK=(1, 16, 32)[fmt], G_QKV=groups[0], G_O=groups[1], G_GU=groups[2],
            G_D=groups[3], PTX=_ptx(),
            STAGES=c.num_stages, SPIN=c.spin, num_warps=c.num_warps,
            num_stages=c.att_stages)
        self.common.update(pdl.launch_args(device) if c.pdl else {'PDL': False})
        self.scale_log2 = b.scale * _LOG2E
        self.sms = (1 if self.on_cpu
                    else torch.cuda.get_device_properties(device).multi_processor_count)
        self.parts = [self._part(flags) for flags in LAYOUTS[c.layout]]
        self.tasks = sum(p.tickets for p in self.parts)
        self.per_sm = None if self.on_cpu else min(p.per_sm for p in self.parts)
        self.n_regs = None if self.on_cpu else max(p.n_regs for p in self.parts)
        self.shared = None if self.on_cpu else max(p.shared for p in self.parts)

    def _constants(self, flags, programs):
        c = self.config
        do_qkv, do_att, do_mlp = flags
        k = dict(self.common, DO_QKV=do_qkv, DO_ATT=do_att, DO_MLP=do_mlp,
                 TICKET_AT=int(TICKET if do_qkv else TICKET_MLP))
        tickets = (self.att.n_splits * self.backend.kv_heads + self.backend.q_heads) * do_att
        for name, blocks in self.blocks.items():
            rb, big = ticket_ranges(blocks, programs, c.ticket_blocks, c.tail)
            k[f'R_{name}'], k[f'BIG_{name}'] = rb, big
            if (do_qkv if name == 'QKV' else do_mlp):
                tickets += big + blocks - big * rb
        if not self.on_cpu:
            cap = c.maxnreg if do_att else c.gemv_maxnreg
            if cap:
                k['maxnreg'] = cap
        return k, tickets

    def _compile(self, constants):
        pos = torch.zeros(1, dtype=torch.long, device=self.backend.device)
        compiled = layer_kernel.warmup(*self._args(0, pos), grid=(1,), **constants)
        return compiled, resident_programs(compiled, self.backend.device)

    def _part(self, flags):
        """The launch of these parts of a layer: ticket ranges sized for the programs that fit
        with single-block tickets (the ranges change the code a little), then compiled again."""
        want = self.config.programs_per_sm
        if self.on_cpu:
            programs = want or 1
            constants, tickets = self._constants(flags, programs)
            return Part(constants, (programs,), None, None, None, tickets)
        _, per_sm = self._compile(self._constants(flags, 1 << 30)[0])
        constants, tickets = self._constants(flags, min(want or per_sm, per_sm) * self.sms)
        compiled, per_sm = self._compile(constants)
        grid = (max(1, min(want or per_sm, per_sm) * self.sms),)
        return Part(constants, grid, per_sm, compiled.n_regs, compiled.metadata.shared, tickets)

    def _args(self, i, pos):
        """layer_kernel's arguments for layer i; all but pos made once a layer."""
        if self._layer_args is None:
            self._layer_args = [self._layer(j) for j in range(self.layers)]
        before, after = self._layer_args[i]
        return before + (pos,) + after

    def _layer(self, i):
        """Layer i's arguments before and after pos."""
        b = self.backend
        layer = b.layers[i]
        k_cache, v_cache = b.k_cache[i], b.v_cache[i]
        # each matrix: (W, S, Z, stride_w, stride_s, ...) of gemv._weight_args (codes as words)
        qkv, o, gu, d = (_weight_args(getattr(layer, name)) for name in MATRICES)
        before = (qkv[0], layer.bqkv if layer.bqkv is not None else qkv[0], o[0], gu[0], d[0],
                  layer.ln1, layer.ln2, b.h, b.q, b.att, b.act, b.cos, b.sin)
        after = (k_cache, v_cache, self.att.part_o, self.att.part_m, self.att.part_l,
                 self.cnt[i], self.err, b.eps, self.scale_log2, k_cache.stride(0),
                 qkv[1], qkv[2], o[1], o[2], gu[1], gu[2], d[1], d[2],
                 qkv[3], qkv[4], o[3], o[4], gu[3], gu[4], d[3], d[4])
        return before, after

    def oversubscribe(self, factor):
        """Launch `factor` times more programs than fit (a test of forward progress)."""
        self.parts = [p._replace(grid=(factor * p.grid[0],)) for p in self.parts]

    def __call__(self, i, pos):
        """Layer i on the residual stream b.h, reading pos from device memory."""
        args = self._args(i, pos)
        first, *rest = self.parts
        layer_kernel[first.grid](*args, **first.constants)
        if self.config.layout == 'split':
            b = self.backend
            b.attention(b.q, b.k_cache[i], b.v_cache[i], pos, b.att)
        for part in rest:
            layer_kernel[part.grid](*args, **part.constants)

    def timeouts(self):
        """Whether any wait has given up since the last reset (a host read: diagnostics)."""
        return int(self.err.item())
