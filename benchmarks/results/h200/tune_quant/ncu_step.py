"""One eager decode step of a preset's fused backend with a kernel-config table, for Nsight
Compute to profile its kernels: python3 ncu_step.py MODEL WEIGHTS TABLE."""
import sys

import torch

from decode_monitor.engine.fused import tables
from decode_monitor.engine.fused.model import FusedBackend
from decode_monitor.engine.sources import load_model

model, weights, table = sys.argv[1:4]
loaded = load_model(model, device='cuda', dtype=torch.bfloat16)
backend = FusedBackend(loaded.model, 2048, use_triton=True, weights=weights,
                       kernel_configs=tables.load(table))
backend.randomize_cache()
token = torch.ones((1, 1), dtype=torch.long, device='cuda')
backend.forward_one(token, torch.tensor([2047], device='cuda'))
torch.cuda.synchronize()
print('step done')
