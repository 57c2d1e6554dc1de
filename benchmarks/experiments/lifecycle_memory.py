"""GPU memory through the decode service's lifecycle (what the node's configure and cleanup
do, without ROS): configure (load, quantise, capture graphs), serve one request, cleanup, and
configure again; memory as torch reserves it and as NVML sees the process use it.

    python benchmarks/experiments/lifecycle_memory.py [--model qwen2.5-7b] [--weights bf16 int4]
"""
import argparse
import json
import os

import torch

from decode_monitor.engine.factory import build_decoder, DecoderSettings
from decode_monitor.serving.service import DecodeService


def nvml_used(pid):
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid:
                return p.usedGpuMemory
    except Exception:
        return None
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='qwen2.5-7b')
    parser.add_argument('--weights', nargs='+', default=['bf16', 'int4'])
    args = parser.parse_args()
    rows = []
    for weights in args.weights:
        settings = DecoderSettings(model=args.model, device='cuda', weights=weights,
                                   max_context=2048)
        answers = []
        service = DecodeService(lambda: build_decoder(settings), lambda *a: None,
                                answers.append)

        def point(stage):
            torch.cuda.synchronize()
            rows.append(dict(weights=weights, stage=stage,
                             allocated=torch.cuda.memory_allocated(),
                             reserved=torch.cuda.memory_reserved(),
                             nvml_process=nvml_used(os.getpid())))
            print(rows[-1], flush=True)
        point('before configure')
        service.start(serve=False)
        assert service.configure(wait=True), service.load_error
        point('configured')
        service.activate()
        service.submit(json.dumps({'id': 'x', 'prompt': 'hello', 'max_new_tokens': 16}))
        while not answers:
            torch.cuda.synchronize()
        point('served one request')
        service.cleanup(wait=True)
        point('cleaned up')
        assert service.configure(wait=True), service.load_error
        point('configured again')
        service.shutdown()
        del service
    print(f'{"weights":8} {"stage":20} {"allocated GB":>12} {"reserved GB":>11} {"NVML GB":>8}')
    for r in rows:
        nv = '-' if r['nvml_process'] is None else f'{r["nvml_process"] / 1e9:.2f}'
        print(f'{r["weights"]:8} {r["stage"]:20} {r["allocated"] / 1e9:12.2f} '
              f'{r["reserved"] / 1e9:11.2f} {nv:>8}')
    if os.environ.get('OUT'):
        with open(os.path.join(os.environ['OUT'], 'lifecycle_memory.json'), 'w') as f:
            json.dump(dict(model=args.model, device=torch.cuda.get_device_name(),
                           torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
