"""The product's qgemm against qgemm_t_probe's kernel at the same config, per MLP matrix of
qwen2.5-7b at 64 and 128 tokens (28 layers in one CUDA graph), then the wgmma waits, registers
and spills of the right layout's compiled kernels: how the run-time trip count's 255 registers
were found (benchmarks/NOTES.md, row 38).

    python benchmarks/experiments/qgemm_right_check.py
"""
import sys

import torch

sys.path.insert(0, __file__.rsplit('/', 1)[0])
import qgemm_t_probe as T  # noqa: E402
import unpack_probe as P  # noqa: E402

from decode_monitor.engine.fused import qgemm as Q  # noqa: E402


def main():
    layers = P.build('int4')
    gen = torch.Generator(device='cuda').manual_seed(5)
    for m in (64, 128):
        for name, n, k, _ in P.SHAPES[2:]:
            x = torch.randn(m, k, device='cuda', generator=gen, dtype=torch.bfloat16)
            cfg = Q.config_for(m)
            probe_cfg = (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                         1 if name == 'wgu' else 4, 2)
            product = P.time_graph(lambda: [Q.qgemm(x, ly[name][0]) for ly in layers])
            given = P.time_graph(lambda: [Q.qgemm(x, ly[name][0], None, cfg) for ly in layers])
            probe = P.time_graph(lambda: [T.qgemm_t(x, ly[name][0], None, probe_cfg)
                                          for ly in layers])
            print(f'{name} M={m} product {product:.3f} product(cfg as given) {given:.3f} '
                  f'probe {probe:.3f}', flush=True)
    for kernel in Q._qgemm_right.device_caches[0][0].values():
        ir = kernel.asm.get('ttgir', '')
        print('kernel', ir.count('warp_group_dot_wait'), ir.count('pendings = 0'), 'regs',
              kernel.n_regs, 'spills', kernel.n_spills)


if __name__ == '__main__':
    main()
