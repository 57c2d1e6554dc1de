"""GPU memory of a quantised fused decoder before and after its dense weights are released.

Loads a model, builds a graphed fused Decoder with quantised weights (the dense matrices are
still in the model), times steps and generates greedily, then calls `release_dense` and
measures again: allocated bytes (torch) and device memory in use (nvidia-smi), the median step
time at position 2000, and whether the greedy tokens are the same. Prints one JSON line.

    python benchmarks/experiments/quant_memory.py qwen2.5-7b int4
"""
import json
import statistics
import subprocess
import sys

import torch

from decode_monitor.engine import fused  # noqa: F401  (registers the backend)
from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.sources import load_model


def smi_mib():
    return int(subprocess.run(['nvidia-smi', '--query-gpu=memory.used',
                               '--format=csv,noheader,nounits'],
                              capture_output=True, text=True).stdout.split()[0])


def main(model, weights):
    out = {'model': model, 'weights': weights}
    loaded = load_model(model, device='cuda', dtype=torch.bfloat16)
    torch.cuda.synchronize()
    out['loaded_alloc_gb'] = torch.cuda.memory_allocated() / 1e9
    dec = Decoder(loaded, mode='graph', backend='fused', max_context=2048, weights=weights)
    torch.cuda.synchronize()
    out['built_alloc_gb'] = torch.cuda.memory_allocated() / 1e9
    out['built_smi_mib'] = smi_mib()
    prompt = list(range(1, 17))
    out['step_ms_before'] = statistics.median(dec.time_steps(2000, 30, warmup=5))
    before = [s.token for s in dec.generate(prompt, max_new_tokens=16)]
    out['freed_gb'] = dec.backend.release_dense(loaded.model) / 1e9
    torch.cuda.synchronize()
    out['released_alloc_gb'] = torch.cuda.memory_allocated() / 1e9
    out['released_smi_mib'] = smi_mib()
    out['step_ms_after'] = statistics.median(dec.time_steps(2000, 30, warmup=5))
    after = [s.token for s in dec.generate(prompt, max_new_tokens=16)]
    out['same_tokens'] = before == after
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == '__main__':
    main(*sys.argv[1:3])
