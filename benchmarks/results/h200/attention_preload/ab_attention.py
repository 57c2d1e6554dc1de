"""A/B in one process: the attention kernels before (w/attention_old.py) and after."""
import importlib.util
import json
import sys

import torch

from decode_monitor.bench.tune import Timer
from decode_monitor.engine.fused import tables
from decode_monitor.engine.fused.model import FusedBackend
from decode_monitor.engine.sources import load_model

spec = importlib.util.spec_from_file_location('attention_old', 'w/attention_old.py')
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
out = []
table = tables.resolve(None, 'cuda')
for model in sys.argv[2:]:
    loaded = load_model(model, device='cuda', dtype=torch.bfloat16)
    for fmt in ('bf16', 'int8', 'int4'):
        b = FusedBackend(loaded.model, 2048, use_triton=True, weights=fmt, kernel_configs=table)
        b.randomize_cache()
        timer = Timer(b, torch)
        runs, logits = [], []
        for variant in ('new', 'old', 'new2'):
            b.set_kernel_configs(table)
            if variant == 'old':
                a = b.attention
                b.attention = old.DecodeAttention(b.q_heads, b.kv_heads, b.head_dim,
                                                  b.max_context, b.device, scale=b.scale,
                                                  config=(a.block_t, a.n_splits, a.num_warps,
                                                          a.num_stages))
            run = timer.prepare()
            run()
            torch.cuda.synchronize()
            logits.append(b.logits.clone())
            runs.append(run)
        t = timer.median_ms(runs, 10)
        row = {'model': loaded.name, 'weights': fmt, 'new_ms': t[0], 'old_ms': t[1],
               'new2_ms': t[2], 'bit_equal': bool(torch.equal(logits[0], logits[1]))}
        print(row, flush=True)
        out.append(row)
        del b, timer, runs
        loaded.model.__dict__.get('_fused_quantised', {}).pop(fmt, None)
        torch.cuda.empty_cache()
    del loaded
    torch.cuda.empty_cache()
json.dump(out, open(sys.argv[1], 'w'), indent=1)
