"""Does a quantised prefill gain from dequantising each matrix in row chunks that stay in L2?

The buffer path (unpack.py) writes a whole matrix dense (up to 271 MB for qwen2.5-7b's gate/up)
and cuBLAS reads it back: both from HBM. Cut into chunks of a few tens of MB, a chunk's dense rows
may still be in L2 when its GEMM reads them, and the next chunk overwrites the same lines. This
times, for qwen2.5-7b's four layer matrices over 28 distinct layers (random int4 weights of the
real shapes), each sequence captured in one CUDA graph and replayed (median of REPLAYS):
dense bf16 GEMMs; the buffer path; the chunked path at several chunk sizes; dequantisation alone,
whole and chunked; qgemm (up to 512 tokens). Every variant's output is first checked against
F.linear on the dense matrix.

    python benchmarks/experiments/unpack_probe.py chunks out.json [M ...]
    python benchmarks/experiments/unpack_probe.py words out.json [M ...]
    python benchmarks/experiments/unpack_probe.py overlap out.json [M ...]
    python benchmarks/experiments/unpack_probe.py qgemm out.json [64 128]

`words` times the int4 unpack kernel's block sizes (rows x groups x warps) over the 28 layers,
and per matrix and M the buffer path against qgemm (to place qgemm's range). `overlap` times
the buffer path with the next matrix dequantised on a side stream (two buffers) beside the
plain one, dense bf16 and qgemm. `qgemm` times qgemm's configs per matrix (QGEMM_CANDIDATES:
2 warps compile to mma.sync, which does not wait on each dot as Triton's wgmma with a register
operand does; the recorded run also had a since removed `lanes` 3, one lane of one group an
iteration, at commit b636ef3).
"""
import json
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from decode_monitor.engine.fused import qgemm as Q
from decode_monitor.engine.fused import unpack
from decode_monitor.engine.fused.quant import QuantWeight, quantize

LAYERS = 28
SHAPES = (('wqkv', 4608, 3584, True), ('wo', 3584, 3584, False),
          ('wgu', 37888, 3584, False), ('wd', 3584, 18944, False))
CHUNK_MB = (8, 16, 24, 32, 48)
REPLAYS = 10


def dense_words(w, buffer):
    return unpack.dense_into(w, buffer)


def dense_bytes(w, buffer):  # the first version: each weight's byte gathered (unpack_bytes)
    n, k = w.shape
    out = buffer[:n * k].view(n, k)
    _unpack_bytes[(n, triton.cdiv(k, 1024))](w.q, w.scale, w.offset, out, k, w.q.stride(0),
                                             w.scale.stride(0), GROUP=w.group, BLOCK=1024)
    return out


@triton.jit
def _unpack_bytes(Q, S, Z, OUT, K: tl.constexpr, stride_q, stride_s, GROUP: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = k < K
    g = k // GROUP
    scale = tl.load(S + row * stride_s + g, mask=inside, other=0.0).to(tl.float32)
    r = k % GROUP
    stored = g * GROUP + (r % (GROUP // 8)) * 8 + r // (GROUP // 8)
    byte = tl.load(Q + row * stride_q + stored // 2, mask=inside, other=0).to(tl.int32)
    code = ((byte >> ((stored % 2) * 4)) & 15).to(tl.float32)
    offset = tl.load(Z + row * stride_s + g, mask=inside, other=0.0).to(tl.float32)
    tl.store(OUT + row * K + k, (code * scale + offset).to(OUT.dtype.element_ty), mask=inside)


def rows_slice(w, r0, r1):
    return QuantWeight(w.fmt, w.q[r0:r1], w.scale[r0:r1],
                       None if w.offset is None else w.offset[r0:r1], w.group)


def chunk_rows(n, k, mb):
    rows = max(128, (mb * 2 ** 20 // (2 * k)) // 128 * 128)
    return [(r, min(n, r + rows)) for r in range(0, n, rows)]


def build(fmt, shapes=SHAPES):
    gen = torch.Generator(device='cuda').manual_seed(0)
    layers = []
    first = {}
    for name, n, k, has_bias in shapes:
        w = quantize(torch.randn(n, k, device='cuda', generator=gen,
                                 dtype=torch.bfloat16) * 0.02, fmt)
        bias = (torch.randn(n, device='cuda', generator=gen, dtype=torch.bfloat16)
                if has_bias else None)
        first[name] = (w, bias)
    for _ in range(LAYERS):
        layer = {}
        for name, (w, bias) in first.items():
            wq = QuantWeight(w.fmt, w.q.clone(), w.scale.clone(),
                             None if w.offset is None else w.offset.clone(), w.group)
            layer[name] = (wq, bias, wq.dequantize(torch.bfloat16))
        layers.append(layer)
    return layers


def variants(layers, m, gen):
    xs = {name: torch.randn(m, k, device='cuda', generator=gen, dtype=torch.bfloat16)
          for name, n, k, _ in SHAPES}
    outs = {name: torch.empty(m, n, device='cuda', dtype=torch.bfloat16)
            for name, n, k, _ in SHAPES}
    last = {}
    buf = unpack.buffer_for([w for w, _, _ in layers[0].values()], torch.bfloat16, 'cuda')

    def mm_into(x, matrix, b, out):
        if b is None:
            torch.mm(x, matrix.t(), out=out)
        else:
            torch.addmm(b, x, matrix.t(), out=out)

    def dense():
        for layer in layers:
            for name, (w, b, d) in layer.items():
                mm_into(xs[name], d, b, outs[name])

    def buffer(into=dense_bytes):
        def run():
            for layer in layers:
                for name, (w, b, d) in layer.items():
                    mm_into(xs[name], into(w, buf), b, outs[name])
        return run

    def chunked(mb, gemm=True, into=dense_bytes):
        def run():
            for layer in layers:
                for name, (w, b, d) in layer.items():
                    n, k = w.shape
                    for r0, r1 in chunk_rows(n, k, mb):
                        part = into(rows_slice(w, r0, r1), buf)
                        if not gemm:
                            continue
                        mm_into(xs[name], part, None if b is None else b[r0:r1],
                                outs[name][:, r0:r1])
        return run

    def unpack_only(into=dense_bytes):
        def run():
            for layer in layers:
                for name, (w, b, d) in layer.items():
                    into(w, buf)
        return run

    def qgemm():  # its own output tensors (the copy into outs is the check's, not timed)
        for layer in layers:
            for name, (w, b, d) in layer.items():
                last[name] = Q.qgemm(xs[name], w, b)

    bufs = (buf, torch.empty_like(buf))
    side = torch.cuda.Stream()

    def overlapped():
        """The next matrix dequantised on a side stream into the other buffer while cuBLAS
        multiplies this one (a buffer is rewritten only after the GEMM that read it)."""
        main = torch.cuda.current_stream()
        mats = [(name, w, b) for layer in layers for name, (w, b, d) in layer.items()]
        ready = [torch.cuda.Event() for _ in mats]
        done = [torch.cuda.Event() for _ in mats]
        side.wait_stream(main)
        unpacked = []
        for i in range(len(mats) + 1):
            if i < len(mats):
                with torch.cuda.stream(side):
                    if i >= 2:
                        side.wait_event(done[i - 2])
                    unpacked.append(dense_words(mats[i][1], bufs[i % 2]))
                    ready[i].record(side)
            if i >= 1:
                name, w, b = mats[i - 1]
                main.wait_event(ready[i - 1])
                mm_into(xs[name], unpacked[i - 1], b, outs[name])
                done[i - 1].record(main)
        main.wait_stream(side)

    runs = {'dense': dense, 'buffer': buffer(), 'unpack_whole': unpack_only(),
            'buffer_w': buffer(dense_words), 'unpack_whole_w': unpack_only(dense_words)}
    for mb in CHUNK_MB:
        runs[f'chunk{mb}'] = chunked(mb)
        runs[f'unpack_chunk{mb}'] = chunked(mb, gemm=False)
        runs[f'chunk{mb}_w'] = chunked(mb, into=dense_words)
        runs[f'unpack_chunk{mb}_w'] = chunked(mb, gemm=False, into=dense_words)
    if m <= 512:
        runs['qgemm'] = qgemm
    runs['overlap_w'] = overlapped
    return runs, xs, outs, last


def check(run, layers, xs, outs, last):
    for t in outs.values():
        t.fill_(float('nan'))
    last.clear()
    run()
    torch.cuda.synchronize()
    for name, t in last.items():
        outs[name].copy_(t)
    worst = 0.0
    for name, (w, b, d) in layers[-1].items():
        ref = F.linear(xs[name], d, b).float()
        worst = max(worst, ((outs[name].float() - ref).norm() / ref.norm()).item())
    return worst


def time_graph(run):
    run()  # compile, plan
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return sorted(times)[len(times) // 2]


def words_sweep(layers):
    """The int4 unpack kernel's blocks, dequantising all 28 layers' matrices."""
    buf = unpack.buffer_for([w for w, _, _ in layers[0].values()], torch.bfloat16, 'cuda')
    ref = layers[-1]['wd'][2]
    rows = []
    for r in (1, 2, 4, 8, 16):
        for g in (1, 2, 4, 8):
            for warps in (2, 4, 8):
                if r * g * 128 < 32 * warps * 4:
                    continue
                blocks = unpack.Int4Blocks(r, g, warps)

                def run():
                    for layer in layers:
                        for w, _, _ in layer.values():
                            unpack.dense_into(w, buf, blocks)
                run()
                assert torch.allclose(buf[:ref.numel()].view_as(ref), ref, rtol=2 ** -7, atol=0)
                ms_ = time_graph(run)
                rows.append({'blocks': list(blocks), 'ms_28_layers': ms_})
                print(f'unpack {blocks} {ms_:.3f} ms', flush=True)
    return rows


def matrices(layers, ms):
    """Per matrix and M: the buffer path (unpack + cuBLAS) against qgemm, 28 layers."""
    buf = unpack.buffer_for([w for w, _, _ in layers[0].values()], torch.bfloat16, 'cuda')
    gen = torch.Generator(device='cuda').manual_seed(2)
    rows = []
    for m in ms:
        for name, n, k, _ in SHAPES:
            x = torch.randn(m, k, device='cuda', generator=gen, dtype=torch.bfloat16)
            out = torch.empty(m, n, device='cuda', dtype=torch.bfloat16)
            runs = {
                'dense': lambda: [torch.mm(x, layer[name][2].t(), out=out) for layer in layers],
                'buffer': lambda: [torch.mm(x, unpack.dense_into(layer[name][0], buf).t(),
                                            out=out) for layer in layers],
                'qgemm': lambda: [Q.qgemm(x, layer[name][0]) for layer in layers]}
            row = {'m': m, 'matrix': name}
            for variant, run in runs.items():
                row[variant] = time_graph(run)
            rows.append(row)
            print(f"M={m:4d} {name:5s} dense {row['dense']:.3f} buffer {row['buffer']:.3f} "
                  f"qgemm {row['qgemm']:.3f}", flush=True)
    return rows


C = Q.QGemmConfig
QGEMM_CANDIDATES = {  # mma.sync (2 warps) against the table's wgmma (4 warps)
    64: [None, C(64, 64, 128, 2, 3, 1, 1), C(64, 64, 128, 2, 4, 4, 1), C(32, 64, 128, 2, 3, 1, 1)],
    128: [None, C(64, 128, 128, 2, 3, 1, 1), C(64, 128, 128, 2, 3, 4, 1),
          C(32, 128, 128, 2, 3, 1, 1), C(64, 64, 128, 2, 3, 1, 1)],
}


def qgemm_configs(layers, ms):
    """Per matrix and M: qgemm's table config against the candidates, 28 layers in a graph,
    each checked against F.linear on the dense matrix."""
    gen = torch.Generator(device='cuda').manual_seed(3)
    rows = []
    for m in ms:
        for name, n, k, _ in SHAPES:
            x = torch.randn(m, k, device='cuda', generator=gen, dtype=torch.bfloat16)
            ref = F.linear(x, layers[-1][name][2]).float()
            for config in QGEMM_CANDIDATES[m]:
                try:
                    got = Q.qgemm(x, layers[-1][name][0], None, config).float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    ms_ = time_graph(lambda: [Q.qgemm(x, layer[name][0], None, config)
                                              for layer in layers])
                except Exception as exc:  # a config this GPU cannot compile
                    err, ms_ = f'{type(exc).__name__}: {str(exc)[:120]}', None
                rows.append({'m': m, 'matrix': name, 'config': config, 'ms_28_layers': ms_,
                             'rel_err': err})
                print(f'M={m:4d} {name:5s} {config} {ms_} err={err}', flush=True)
    return rows


def main(argv):
    mode, out_path = argv[0], argv[1]
    if mode == 'qgemm':
        rows = qgemm_configs(build('int4'), [int(a) for a in argv[2:]] or [64, 128])
        with open(out_path, 'w') as f:
            json.dump({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
                       'rows': rows}, f, indent=1)
        for m in sorted({r['m'] for r in rows}):
            for name, *_ in SHAPES:
                got = [r for r in rows if r['m'] == m and r['matrix'] == name
                       and r['ms_28_layers'] is not None]
                best = min(got, key=lambda r: r['ms_28_layers'])
                print(f"M={m} {name}: table {got[0]['ms_28_layers']:.3f} best "
                      f"{best['ms_28_layers']:.3f} {best['config']}")
        return
    if mode in ('chunks', 'overlap'):
        return chunks(out_path, [int(a) for a in argv[2:]] or [128, 512, 2048],
                      None if mode == 'chunks' else ('dense', 'buffer_w', 'overlap_w', 'qgemm'))
    layers = build('int4')
    result = {'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
              'unpack_blocks': words_sweep(layers),
              'matrices': matrices(layers, [int(a) for a in argv[2:]] or [16, 32, 64, 128])}
    with open(out_path, 'w') as f:
        json.dump(result, f, indent=1)
    best = min(result['unpack_blocks'], key=lambda r: r['ms_28_layers'])
    print(f"\nbest unpack blocks {best['blocks']}: {best['ms_28_layers']:.3f} ms "
          f"(default {unpack.INT4_BLOCKS})")
    print('M     matrix  dense  buffer  qgemm (ms, 28 layers)')
    for r in result['matrices']:
        print(f"{r['m']:<5d} {r['matrix']:6s} {r['dense']:6.3f} {r['buffer']:7.3f} "
              f"{r['qgemm']:6.3f}")


def chunks(out_path, ms, only=None):
    layers = build('int4')
    gen = torch.Generator(device='cuda').manual_seed(1)
    rows = []
    for m in ms:
        runs, xs, outs, last = variants(layers, m, gen)
        for name, run in runs.items():
            if only and name not in only:
                continue
            err = None if name.startswith('unpack') else check(run, layers, xs, outs, last)
            ms_ = time_graph(run)
            rows.append({'m': m, 'variant': name, 'ms_28_layers': ms_, 'rel_err': err})
            print(f'M={m:5d} {name:16s} {ms_:8.3f} ms  err={err}', flush=True)
        del runs, xs, outs, last
        torch.cuda.empty_cache()
    with open(out_path, 'w') as f:
        json.dump({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
                   'rows': rows}, f, indent=1)
    print('\nM      ' + ' '.join(f'{n:>14s}' for n in dict.fromkeys(r['variant'] for r in rows)))
    for m in ms:
        print(f'{m:<6d} ' + ' '.join(f"{r['ms_28_layers']:14.3f}" for r in rows if r['m'] == m))


if __name__ == '__main__':
    main(sys.argv[1:])
