"""How fast can a program-per-row-block kernel read a code matrix, by access pattern alone?

No dequantisation, no x: each program XORs the 32-bit words of its rows together, chunk after
chunk, as the GEMVs walk K. The patterns differ only in how many rows a program reads at once
and how many contiguous bytes of each row a chunk takes (64 rows x 128 bytes is the shipped
int4 gate/up config on qwen2.5-7b; 16 x 512 the int8 one), and in the storage: row-major (a
row's K / 8 words in a run, as quant.py stores them) against tiled (each program's chunk one
contiguous run of memory: the same bytes, reordered). Matrix: qwen2.5-7b's gate/up rows in int4
(37888), 2048 bytes a row (1792 there, so that every pattern divides it); 28 distinct ones
captured in one graph, as kernels_in_graph.py does.

`--shape down` reads int8 down_proj's shape instead (3584 rows of 18944 bytes), row-major with
the rows packed (as stored) and with each row padded by `--pad` bytes (the same bytes read, the
row stride no longer a multiple of 4 KB's neighbours): whether that shape's stride, not the
kernel, holds its GEMVs to ~2.7 TB/s.

    python benchmarks/experiments/access_pattern_probe.py [--shape down] [--out DIR]
"""
import argparse
import json
import os

import torch
import triton
import triton.language as tl

from kernels_in_graph import graph_us

LAYERS = 28
ROWS, ROW_WORDS = 37888, 512  # qwen2.5-7b's int4 gate/up rows, 2 KB a row (1792 there)
# (rows a program, words a row a chunk, warps, stages); tiled or row-major
DOWN_ROWS, DOWN_WORDS = 3584, 4736  # qwen2.5-7b's int8 down_proj: 18944 bytes a row
DOWN_PATTERNS = [(4, 256, 4, 3), (4, 256, 4, 2), (32, 128, 8, 2), (16, 128, 4, 2),
                 (8, 128, 4, 2), (64, 32, 4, 2), (16, 32, 4, 2)]
PATTERNS = [(64, 32, 4, 1), (64, 32, 4, 2), (64, 32, 4, 3), (32, 64, 4, 2), (16, 128, 4, 2),
            (8, 256, 4, 2), (4, 512, 4, 1), (64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 8, 3)]


@triton.jit
def touch_kernel(W, OUT, stride, ROW_WORDS: tl.constexpr, BLOCK_N: tl.constexpr,
                 WORDS: tl.constexpr, TILED: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    CHUNKS: tl.constexpr = ROW_WORDS // WORDS
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32)
    for c in tl.range(0, CHUNKS, num_stages=STAGES):
        if TILED:  # chunk c of this row block: BLOCK_N x WORDS words in one run
            base = (pid.to(tl.int64) * CHUNKS + c) * (BLOCK_N * WORDS)
            ptrs = W + base + tl.arange(0, BLOCK_N)[:, None] * WORDS
        else:
            ptrs = W + rows.to(tl.int64)[:, None] * stride + c * WORDS
        ptrs += tl.arange(0, WORDS)[None, :]
        acc ^= tl.load(ptrs)
    tl.store(OUT + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--out', default=None)
    p.add_argument('--shape', choices=('gate_up', 'down'), default='gate_up')
    p.add_argument('--pad', type=int, nargs='+', default=[0, 128, 512],
                   help='bytes of padding a row (down)')
    args = p.parse_args()
    down = args.shape == 'down'
    n_rows, row_words = (DOWN_ROWS, DOWN_WORDS) if down else (ROWS, ROW_WORDS)
    rows = []
    for pad in (args.pad if down else [0]):
        stride = row_words + pad // 4
        mats = [torch.randint(-2 ** 31, 2 ** 31 - 1, (n_rows, stride), dtype=torch.int32,
                              device='cuda') for _ in range(LAYERS)]
        nbytes = n_rows * row_words * 4
        for block_n, words, warps, stages in (DOWN_PATTERNS if down else PATTERNS):
            grid = n_rows // block_n
            out = torch.empty(LAYERS, grid, dtype=torch.int32, device='cuda')
            for tiled in ((False,) if down else (False, True)):
                calls = [lambda i=i: touch_kernel[(grid,)](
                    mats[i], out[i], stride, ROW_WORDS=row_words, BLOCK_N=block_n,
                    WORDS=words, TILED=tiled, STAGES=stages, num_warps=warps)
                    for i in range(LAYERS)]
                us = graph_us(calls)
                row = {'rows': block_n, 'bytes_a_row_a_chunk': words * 4, 'warps': warps,
                       'stages': stages, 'tiled': tiled, 'pad': pad, 'us': us,
                       'tb_s': nbytes / us / 1e6}
                rows.append(row)
                print(f"{block_n:4} x {words * 4:5} B  w{warps} s{stages}  pad {pad:4}  "
                      f"{'tiled' if tiled else 'rows ':5}  {us:7.2f} us  {row['tb_s']:5.2f} TB/s",
                      flush=True)
        mats = None  # the next padding's matrices
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = 'access_pattern_probe' + ('_down' if down else '') + '.json'
        with open(os.path.join(args.out, name), 'w') as f:
            json.dump({'device': torch.cuda.get_device_name(), 'layers': LAYERS,
                       'rows': n_rows, 'row_bytes': row_words * 4, 'cells': rows}, f, indent=1)


if __name__ == '__main__':
    main()
