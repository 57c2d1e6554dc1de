"""Weights streamed across matrix boundaries by a loader warp: a persistent GEMV chain probe.

The persistent backend's programs stop streaming at every dependency: a task waits for the
tasks before it, then starts its loads. But weights are constant: only the multiply has to
wait, not the load. Here one launch runs a qwen2.5-7b step's 113 bf16 GEMVs in a chain (each
matrix's x is the previous matrix's output, as in the step: q/k/v -> o_proj -> gate/up -> down
-> the next layer, then lm_head; no attention, norms or activations) on one program an SM,
warp-specialised:

- a loader warp walks the program's tiles (BN rows x BK columns, one matrix after the other)
  and copies each into a ring of S shared-memory slots by TMA as soon as a slot is free; it
  never waits on a dependency, so it runs up to S tiles (S x BN x BK x 2 bytes) into the next
  matrix while the compute warps wait;
- the compute warps (the default partition) wait, before a matrix's first tile, until every
  program has counted the previous matrix done (a counter in global memory, acquire), read x
  through L2 (optionally a tile ahead), multiply each tile as it lands, free its slot, store
  their rows and count the matrix done (release).

A program's tiles of a matrix are whole row blocks dealt round-robin, or (stream-K `shares`)
an equal contiguous share of the matrix's tiles: a row block split between programs leaves
each part's row sums in a scratch slot, and the part counted last adds them in program order
(deterministic). `no waits` skips the dependency waits: wrong results, the time of the stream
alone. A third mode (each chunk of x waited for on its own counter) hangs on an H200 and is
left out of the default set.

All programs must be resident (one an SM: the ring takes most of the shared memory); a wait
gives up after SPIN polls and raises a flag. Beside it, in the same run, the same chain as one
launch of the fused backend's GEMV kernel per matrix (the shipped H200 table's bf16 configs),
captured in one graph. Both are checked against torch (fp32 products, bf16 outputs).

    python benchmarks/experiments/ring_chain_probe.py --out ring.json
    python benchmarks/experiments/ring_chain_probe.py --compile-only     # sm_90, no GPU
"""
import argparse
import json
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, os.path.dirname(__file__))

HIDDEN, QKV, INTER, VOCAB = 3584, 4608, 18944, 152064  # qwen2.5-7b
SPIN = int(os.environ.get('RING_SPIN', 1 << 22))  # polls before a wait gives up
# the kernels read the shapes as compile-time constants
QKV_C, HIDDEN_C, INTER_C, VOCAB_C, SPIN_C = (gl.constexpr(v)
                                             for v in (QKV, HIDDEN, INTER, VOCAB, SPIN))


@gluon.jit
def _start(p, P, T):
    """The first tile of program p's share of T tiles (stream-K: equal contiguous shares)."""
    return (p * T) // P


@gluon.jit
def _owner(t, P, T):
    """The program whose share holds tile t."""
    p = (t * P) // T
    while _start(p + 1, P, T) <= t:
        p += 1
    return p


@gluon.jit
def _load_matrix(desc, ring, ready, empty, it, row0, N: gl.constexpr, K: gl.constexpr,
                 pid, P, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr,
                 SHARES: gl.constexpr):
    """The loader's tiles of one matrix (rows row0 + [0, N) of desc's tensor), in the order the
    compute warps take them, each copied into the next ring slot once it is free. SHARES: the
    program's equal share of the matrix's tiles (row block after row block); else whole row
    blocks dealt round-robin."""
    KT: gl.constexpr = K // BK
    if SHARES == 1:
        T: gl.constexpr = (N // BN) * KT
        for t in range(_start(pid, P, T), _start(pid + 1, P, T)):
            s = it % S
            mbarrier.wait(empty.index(s), ((it // S) & 1) ^ 1)
            mbarrier.expect(ready.index(s), desc.block_type.nbytes)
            tma.async_copy_global_to_shared(desc, [row0 + (t // KT) * BN, (t % KT) * BK],
                                            ready.index(s), ring.index(s))
            it += 1
    else:
        for b in range(pid, N // BN, P):
            for kt in range(KT):
                s = it % S
                mbarrier.wait(empty.index(s), ((it // S) & 1) ^ 1)
                mbarrier.expect(ready.index(s), desc.block_type.nbytes)
                tma.async_copy_global_to_shared(desc, [row0 + b * BN, kt * BK], ready.index(s),
                                                ring.index(s))
                it += 1
    return it


@gluon.jit
def _loader(dq, do, dgu, dd, dh, ring, ready, empty, L, P, BN: gl.constexpr, BK: gl.constexpr,
            S: gl.constexpr, SHARES: gl.constexpr):
    pid = gl.program_id(0)
    it = 0
    for layer in range(L):
        it = _load_matrix(dq, ring, ready, empty, it, layer * QKV_C, QKV_C, HIDDEN_C, pid, P,
                          BN, BK, S, SHARES)
        it = _load_matrix(do, ring, ready, empty, it, layer * HIDDEN_C, HIDDEN_C, HIDDEN_C, pid,
                          P, BN, BK, S, SHARES)
        it = _load_matrix(dgu, ring, ready, empty, it, layer * 2 * INTER_C, 2 * INTER_C,
                          HIDDEN_C, pid, P, BN, BK, S, SHARES)
        it = _load_matrix(dd, ring, ready, empty, it, layer * HIDDEN_C, HIDDEN_C, INTER_C, pid,
                          P, BN, BK, S, SHARES)
    _load_matrix(dh, ring, ready, empty, it, 0, VOCAB_C, HIDDEN_C, pid, P, BN, BK, S, SHARES)


@gluon.jit
def _ready(CH, c, upto, KT: gl.constexpr, TARGET: gl.constexpr, ERR, LAYOUT: gl.constexpr):
    """Chunks [0, upto) of x are known written; make sure chunk c is: read every chunk's
    counter at once until the first not yet complete lies past c."""
    if c >= upto:
        KT_P2: gl.constexpr = triton.next_power_of_2(KT)
        offs = gl.arange(0, KT_P2, layout=gl.SliceLayout(0, LAYOUT))
        n = 0
        while (upto <= c) & (n < SPIN_C):
            done = gl.load(CH + offs, mask=offs < KT, other=TARGET, volatile=True)
            upto = gl.min(gl.where(done >= TARGET, KT_P2, offs), axis=0)
            n += 1
        if upto <= c:
            gl.atomic_add(ERR, 1)
        gl.atomic_add(CH + c, 0, sem='acquire')
        gl.thread_barrier()
    return upto


@gluon.jit
def _tiles(ring, ready, empty, it, X, t, t_end, kt0, CH, upto, ERR, KT: gl.constexpr,
           BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, LAYOUT: gl.constexpr,
           X_AHEAD: gl.constexpr, CHUNKS: gl.constexpr):
    """Tiles t .. t_end - 1 of one row block (its K chunks kt0, kt0 + 1, ...) as they land:
    the (BN, BK) products with x summed per row. CHUNKS: each chunk of x waited for on its own
    counter (CH) before it is read."""
    TARGET: gl.constexpr = BK // BN  # row blocks of the previous matrix in a chunk of x
    cols = gl.arange(0, BK, layout=gl.SliceLayout(0, LAYOUT))
    acc = gl.zeros([BN, BK], gl.float32, LAYOUT)
    if CHUNKS:
        upto = _ready(CH, kt0, upto, KT, TARGET, ERR, LAYOUT)
    x = gl.load(X + kt0 * BK + cols, cache_modifier='.cg')
    kt = kt0
    for _ in range(t, t_end):
        s = it % S
        if X_AHEAD:  # the next chunk of x requested a tile ahead (the last wraps to 0)
            if CHUNKS:
                upto = _ready(CH, (kt + 1) % KT, upto, KT, TARGET, ERR, LAYOUT)
            x_next = gl.load(X + ((kt + 1) % KT) * BK + cols, cache_modifier='.cg')
        else:
            if CHUNKS:
                upto = _ready(CH, kt, upto, KT, TARGET, ERR, LAYOUT)
            x = gl.load(X + kt * BK + cols, cache_modifier='.cg')
        mbarrier.wait(ready.index(s), (it // S) & 1)
        w = ring.index(s).load(LAYOUT)
        fence_async_shared()
        mbarrier.arrive(empty.index(s), count=1)
        acc += w.to(gl.float32) * gl.expand_dims(x.to(gl.float32), 0)
        if X_AHEAD:
            x = x_next
        kt += 1
        it += 1
    return it, gl.sum(acc, axis=1), upto


@gluon.jit
def _compute_matrix(ring, ready, empty, it, X, Y, m, CNT, ERR, SCR, RBC, RB_MAX, pid, P,
                    N: gl.constexpr, K: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                    S: gl.constexpr, LAYOUT: gl.constexpr, X_AHEAD: gl.constexpr,
                    WAIT: gl.constexpr, SHARES: gl.constexpr):
    """This program's part of matrix m, y = W x, once every program finished m - 1 (WAIT
    False: at once, a probe of the stream alone; the results are then wrong).

    SHARES 1: a row block split between programs leaves each part's row sums in SCR (two slots
    a program: its share's first and last row block); the part counted last (RBC, one counter
    a row block) adds them in program order and stores the rows. SHARES 2: row blocks dealt
    round-robin, each counted into its chunk of the next matrix's x (RBC, a counter a chunk),
    and each chunk of x waited for alone instead of the whole previous matrix."""
    if WAIT and m > 0 and SHARES != 2:
        n = 0
        while (gl.load(CNT + m - 1, volatile=True) < P) & (n < SPIN_C):
            n += 1
        if gl.atomic_add(CNT + m - 1, 0, sem='acquire') < P:
            gl.atomic_add(ERR, 1)
        gl.thread_barrier()
    rows = gl.arange(0, BN, layout=gl.SliceLayout(1, LAYOUT))
    KT: gl.constexpr = K // BK
    if SHARES == 1:
        T: gl.constexpr = (N // BN) * KT
        t0 = _start(pid, P, T)
        t1 = _start(pid + 1, P, T)
        t = t0
        while t < t1:
            rb = t // KT
            seg_end = gl.minimum(t1, (rb + 1) * KT)
            it, y, _ = _tiles(ring, ready, empty, it, X, t, seg_end, t - rb * KT, RBC, 0,
                              ERR, KT, BN, BK, S, LAYOUT, X_AHEAD, False)
            if (t == rb * KT) & (seg_end == (rb + 1) * KT):
                gl.store(Y + rb * BN + rows, y.to(gl.bfloat16))
            else:
                slot = (t != t0).to(gl.int32)
                gl.store(SCR + (pid * 2 + slot) * BN + rows, y)
                gl.thread_barrier()
                pa = _owner(rb * KT, P, T)
                pb = _owner((rb + 1) * KT - 1, P, T)
                done = gl.atomic_add(RBC + m * RB_MAX + rb, 1, sem='acq_rel')
                gl.thread_barrier()
                if done == pb - pa:
                    total = gl.zeros([BN], gl.float32, gl.SliceLayout(1, LAYOUT))
                    for q in range(pa, pb + 1):
                        q_slot = (_start(q, P, T) // KT != rb).to(gl.int32)
                        total += gl.load(SCR + (q * 2 + q_slot) * BN + rows,
                                         cache_modifier='.cg')
                    gl.store(Y + rb * BN + rows, total.to(gl.bfloat16))
            t = seg_end
    else:
        CHUNKS: gl.constexpr = WAIT and SHARES == 2
        upto = KT * (m == 0).to(gl.int32)  # the first matrix's x: written before the launch
        for b in range(pid, N // BN, P):
            it, y, upto = _tiles(ring, ready, empty, it, X, b * KT, (b + 1) * KT, 0,
                                 RBC + (m - 1) * RB_MAX, upto, ERR, KT, BN, BK, S, LAYOUT,
                                 X_AHEAD, CHUNKS)
            gl.store(Y + b * BN + rows, y.to(gl.bfloat16))
            if CHUNKS:  # count the row block into its chunk of the next matrix's x
                gl.thread_barrier()
                gl.atomic_add(RBC + m * RB_MAX + (b * BN) // BK, 1, sem='release')
    gl.thread_barrier()
    gl.atomic_add(CNT + m, 1, sem='release')
    return it


@gluon.jit
def _compute(ring, ready, empty, H, H2, Q, A, LOGITS, CNT, ERR, SCR, RBC, RB_MAX, L, P,
             BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, LAYOUT: gl.constexpr,
             X_AHEAD: gl.constexpr, WAIT: gl.constexpr, SHARES: gl.constexpr):
    pid = gl.program_id(0)
    it = 0
    for layer in range(L):
        m = 4 * layer
        it = _compute_matrix(ring, ready, empty, it, H, Q, m, CNT, ERR, SCR, RBC, RB_MAX, pid,
                             P, QKV_C, HIDDEN_C, BN, BK, S, LAYOUT, X_AHEAD, WAIT, SHARES)
        it = _compute_matrix(ring, ready, empty, it, Q, H2, m + 1, CNT, ERR, SCR, RBC, RB_MAX,
                             pid, P, HIDDEN_C, HIDDEN_C, BN, BK, S, LAYOUT, X_AHEAD, WAIT,
                             SHARES)
        it = _compute_matrix(ring, ready, empty, it, H2, A, m + 2, CNT, ERR, SCR, RBC, RB_MAX,
                             pid, P, 2 * INTER_C, HIDDEN_C, BN, BK, S, LAYOUT, X_AHEAD, WAIT,
                             SHARES)
        it = _compute_matrix(ring, ready, empty, it, A, H, m + 3, CNT, ERR, SCR, RBC, RB_MAX,
                             pid, P, HIDDEN_C, INTER_C, BN, BK, S, LAYOUT, X_AHEAD, WAIT,
                             SHARES)
    _compute_matrix(ring, ready, empty, it, H, LOGITS, 4 * L, CNT, ERR, SCR, RBC, RB_MAX, pid,
                    P, VOCAB_C, HIDDEN_C, BN, BK, S, LAYOUT, X_AHEAD, WAIT, SHARES)


@gluon.jit
def chain_kernel(dq, do, dgu, dd, dh, H, H2, Q, A, LOGITS, CNT, ERR, SCR, RBC, RB_MAX, L,
                 P,
                 BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, X_AHEAD: gl.constexpr,
                 WAIT: gl.constexpr, SHARES: gl.constexpr, num_warps: gl.constexpr):
    LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
    ring = gl.allocate_shared_memory(gl.bfloat16, [S, BN, BK], dq.layout)
    ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(S):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_compute, (ring, ready, empty, H, H2, Q, A, LOGITS, CNT, ERR, SCR, RBC, RB_MAX, L, P,
                    BN, BK, S, LAYOUT, X_AHEAD, WAIT, SHARES)),
        (_loader, (dq, do, dgu, dd, dh, ring, ready, empty, L, P, BN, BK, S, SHARES)),
    ], [1], [24])


class Model:
    """A chain's weights (random, bf16), stacked per kind, and its activations."""

    def __init__(self, layers, device):
        g = torch.Generator(device=device).manual_seed(0)

        def rand(n, k):
            return (torch.randn(n, k, device=device, generator=g) * k ** -0.5).to(torch.bfloat16)
        self.layers = layers
        self.wq = rand(layers * QKV, HIDDEN)
        self.wo = rand(layers * HIDDEN, HIDDEN)
        self.wgu = rand(layers * 2 * INTER, HIDDEN)
        self.wd = rand(layers * HIDDEN, INTER)
        self.wh = rand(VOCAB, HIDDEN)
        self.h0 = torch.randn(HIDDEN, device=device, generator=g).to(torch.bfloat16)
        self.h = torch.empty(HIDDEN, device=device, dtype=torch.bfloat16)
        self.h2 = torch.empty(HIDDEN, device=device, dtype=torch.bfloat16)  # o_proj's out
        self.q = torch.empty(QKV, device=device, dtype=torch.bfloat16)
        self.a = torch.empty(2 * INTER, device=device, dtype=torch.bfloat16)
        self.logits = torch.empty(VOCAB, device=device, dtype=torch.bfloat16)

    def nbytes(self):
        return sum(t.numel() * 2 for t in (self.wq, self.wo, self.wgu, self.wd, self.wh))

    def matrices(self):
        """(W, x, y) in chain order; x and y are the activation buffers (views)."""
        out = []
        for i in range(self.layers):
            out += [(self.wq[i * QKV:(i + 1) * QKV], self.h, self.q),
                    (self.wo[i * HIDDEN:(i + 1) * HIDDEN], self.q[:HIDDEN], self.h2),
                    (self.wgu[i * 2 * INTER:(i + 1) * 2 * INTER], self.h2, self.a),
                    (self.wd[i * HIDDEN:(i + 1) * HIDDEN], self.a[:INTER], self.h)]
        return out + [(self.wh, self.h, self.logits)]

    def reference(self):
        """The chain in torch: fp32 products, each output rounded to bf16 as the kernels do."""
        self.h.copy_(self.h0)
        for w, x, y in self.matrices():
            y.copy_((w.float() @ x.float()).to(torch.bfloat16))
        return self.logits.clone()


def ring_launcher(model, bn, bk, stages, warps, ahead, wait, shares):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    descs = [TensorDescriptor.from_tensor(t, [bn, bk], layout)
             for t in (model.wq, model.wo, model.wgu, model.wd, model.wh)]
    dev = model.h.device
    programs = torch.cuda.get_device_properties(dev).multi_processor_count
    cnt = torch.zeros(4 * model.layers + 1, dtype=torch.int32, device=dev)
    err = torch.zeros(1, dtype=torch.int32, device=dev)
    scr = torch.zeros(programs * 2 * bn, dtype=torch.float32, device=dev)
    rb_max = VOCAB // bn
    rbc = torch.zeros((4 * model.layers + 1) * rb_max, dtype=torch.int32, device=dev)

    def run():
        model.h.copy_(model.h0)
        cnt.zero_()
        rbc.zero_()
        chain_kernel[(programs,)](*descs, model.h, model.h2, model.q, model.a, model.logits,
                                  cnt, err, scr, rbc, rb_max, model.layers, programs, BN=bn, BK=bk,
                                  S=stages, X_AHEAD=ahead, WAIT=wait, SHARES=shares,
                                  num_warps=warps)
    return run, err


def fused_launcher(model):
    from decode_monitor.engine.fused import gemv as G
    from decode_monitor.engine.fused.configs import GemvConfig
    configs = {QKV: GemvConfig(4, 512, 4, 1), HIDDEN: GemvConfig(8, 512, 4, 4),
               2 * INTER: GemvConfig(4, 512, 4, 5), VOCAB: GemvConfig(8, 512, 4, 4)}
    down = GemvConfig(4, 512, 4, 3)  # the shipped H200 table's bf16 rows (qwen2.5-7b)

    def run():
        model.h.copy_(model.h0)
        for w, x, y in model.matrices():
            G.gemv(w, x, y, config=down if w.shape[1] == INTER else configs[w.shape[0]])
    return run


def graph_ms(run, reps=20):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    times = []
    for _ in range(reps):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CONFIGS = [  # BN, BK, ring slots S, compute warps, x a tile ahead, waits, SHARES mode
    # row blocks dealt round-robin, x read at each tile
    (16, 256, 16, 4, False, True, False), (16, 256, 24, 4, False, True, False),
    (8, 256, 32, 4, False, True, False), (16, 256, 12, 8, False, True, False),
    (32, 256, 8, 8, False, True, False), (16, 128, 32, 4, False, True, False),
    # x requested a tile ahead
    (32, 256, 8, 8, True, True, False), (32, 256, 12, 8, True, True, False),
    (64, 256, 6, 8, True, True, False), (16, 256, 16, 4, True, True, False),
    (32, 256, 8, 4, True, True, False), (32, 256, 12, 8, True, False, False),
    (32, 256, 8, 4, True, False, False),
    # equal shares of each matrix's tiles (stream-K)
    (32, 256, 8, 4, True, True, True), (32, 256, 12, 4, True, True, True),
    (16, 256, 16, 4, True, True, True), (64, 256, 6, 4, True, True, True),
    (32, 256, 8, 8, True, True, True), (32, 256, 8, 4, True, False, True),
    # row blocks round-robin, each chunk of x waited for on its own (mode 2): these hang on an
    # H200 (past the counters' spin limit too, so not in their waits; not diagnosed)
    (32, 256, 8, 4, True, True, 2), (64, 256, 6, 4, True, True, 2),
    (32, 256, 12, 4, True, True, 2)]
HANGS = (19, 20, 21)  # left out unless named with --configs


def compile_only(indices=None):
    """Each config built for sm_90 (no GPU): registers, spills, shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from compile_sm90 import _resources
    names = chain_kernel.arg_names
    for bn, bk, stages, warps, ahead, wait, shares in [CONFIGS[i] for i in (
            indices or range(len(CONFIGS)))]:
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
        desc = f'tensordesc<bf16[{bn}, {bk}],{layout!r}>'
        types = {n: desc for n in ('dq', 'do', 'dgu', 'dd', 'dh')}
        types.update({n: '*bf16' for n in ('H', 'H2', 'Q', 'A', 'LOGITS')}, CNT='*i32', ERR='*i32',
                     SCR='*fp32', RBC='*i32', RB_MAX='i32', L='i32', P='i32')
        consts = dict(BN=bn, BK=bk, S=stages, X_AHEAD=ahead, WAIT=wait, SHARES=shares,
                      num_warps=warps)
        src = GluonASTSource(chain_kernel, {n: types.get(n, 'constexpr') for n in names},
                             {(names.index(c),): v for c, v in consts.items()})
        out = triton.compile(src, target=GPUTarget('cuda', 90, 32),
                             options={'num_warps': warps})
        print(f'BN {bn} BK {bk} S {stages} warps {warps} x ahead {ahead} wait {wait} '
              f'shares {shares}: '
              f'{_resources(out)}', flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--layers', type=int, default=28)
    p.add_argument('--out')
    p.add_argument('--compile-only', action='store_true')
    p.add_argument('--configs', type=int, nargs='+', help='indices into CONFIGS (default: all)')
    args = p.parse_args(argv)
    if args.compile_only:
        return compile_only(args.configs)
    model = Model(args.layers, 'cuda')
    peak = None
    try:
        import pynvml
        pynvml.nvmlInit()
        hnd = pynvml.nvmlDeviceGetHandleByIndex(0)
        mhz = pynvml.nvmlDeviceGetMaxClockInfo(hnd, pynvml.NVML_CLOCK_MEM)
        bits = pynvml.nvmlDeviceGetMemoryBusWidth(hnd)
        peak = mhz * 1e6 * bits * 2 / 8
    except Exception as exc:  # noqa: BLE001  the % column is optional
        print('no NVML peak:', exc)
    ref = model.reference()
    result = {'gpu': torch.cuda.get_device_name(), 'bytes': model.nbytes(), 'peak_bps': peak,
              'layers': args.layers, 'rows': []}

    def record(name, run, err=None):
        row = {'variant': name}
        try:
            run()
            torch.cuda.synchronize()
            row['rel_err'] = rel(model.logits, ref)
            row['timeouts'] = int(err.item()) if err is not None else 0
            ms = graph_ms(run)
            row.update(ms=round(ms, 4), tbps=round(model.nbytes() / ms / 1e9, 3))
            if peak:
                row['pct_peak'] = round(100 * model.nbytes() / (ms * 1e-3) / peak, 1)
            row['timeouts_after'] = int(err.item()) if err is not None else 0
        except Exception as exc:  # noqa: BLE001  a probe records what broke and goes on
            row['error'] = f'{type(exc).__name__}: {exc}'[:1500]
        print(json.dumps(row), flush=True)
        result['rows'].append(row)

    record('fused GEMV a launch', fused_launcher(model))
    chosen = args.configs or [i for i in range(len(CONFIGS)) if i not in HANGS]
    for bn, bk, s, w, ahead, wait, shares in [CONFIGS[i] for i in chosen]:
        run, err = ring_launcher(model, bn, bk, s, w, ahead, wait, shares)
        record(f'ring BN {bn} BK {bk} S {s} warps {w}' + (' x ahead' if ahead else '')
               + ('', ' shares', ' chunk waits')[shares] + ('' if wait else ' no waits'), run,
               err)
    record('fused GEMV a launch (again)', fused_launcher(model))
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
