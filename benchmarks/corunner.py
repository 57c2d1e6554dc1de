"""A process that competes for the GPU, driven by files in a control folder (for shared_gpu.py).

    python benchmarks/corunner.py copy|matmul CONTROL_DIR

Imports torch at once (the slow part, no GPU context yet), then waits for CONTROL_DIR/init-KIND
before it creates its CUDA context and buffers, writes ready-KIND, waits for go-KIND, runs its
loop until stop-KIND appears and writes result-KIND.json (work done while running).

copy: 1 GiB device-to-device copies (2 GiB moved each); matmul: bf16 8192x8192 products.
"""
import json
import os
import sys
import time

import torch


def wait_for(path, timeout_s=300):
    end = time.time() + timeout_s
    while not os.path.exists(path):
        if time.time() > end:
            sys.exit(f'corunner: {path} never appeared')
        time.sleep(0.01)


def main(kind, control):
    wait_for(os.path.join(control, f'init-{kind}'))
    torch.manual_seed(0)
    if kind == 'copy':
        src = torch.rand(2**28, device='cuda')  # 1 GiB of fp32
        dst = torch.empty_like(src)

        def work():
            dst.copy_(src)
        unit, per_iter = 'GB/s (read + write)', 2 * src.numel() * 4 / 1e9
    elif kind == 'matmul':
        n = 8192
        a = torch.randn(n, n, device='cuda', dtype=torch.bfloat16)
        b = torch.randn(n, n, device='cuda', dtype=torch.bfloat16)
        c = torch.empty(n, n, device='cuda', dtype=torch.bfloat16)

        def work():
            torch.mm(a, b, out=c)
        unit, per_iter = 'TFLOP/s', 2 * n**3 / 1e12
    else:
        sys.exit(f'corunner: kind must be copy or matmul, not {kind!r}')
    work()
    torch.cuda.synchronize()
    open(os.path.join(control, f'ready-{kind}'), 'w').close()
    wait_for(os.path.join(control, f'go-{kind}'))
    stop = os.path.join(control, f'stop-{kind}')
    iters, t0 = 0, time.perf_counter()
    while not os.path.exists(stop):
        for _ in range(4):
            work()
        torch.cuda.synchronize()
        iters += 4
    seconds = time.perf_counter() - t0
    with open(os.path.join(control, f'result-{kind}.json'), 'w') as f:
        json.dump({'kind': kind, 'pid': os.getpid(), 'iterations': iters, 'seconds': seconds,
                   'rate': iters * per_iter / seconds, 'unit': unit}, f)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
