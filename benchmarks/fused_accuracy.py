"""Logit accuracy of backend `fused` in bf16, against `hf` in bf16 and an fp32 reference.

Two bf16 implementations of the same model never agree exactly: each rounds differently, and
a deep random-weight model amplifies rounding from layer to layer. So besides the plain
fused-vs-hf error, this measures each bf16 backend against `hf` run on an fp32 copy of the same
weights: the fused backend should be at least as close to it as `hf` in bf16 is. Prefill logits
and decode-step logits (Triton kernels on CUDA) are compared, short and past 4096 positions.

    python benchmarks/fused_accuracy.py --models llama-3-8b --out results/
"""
import argparse
import copy
import json
import os

import torch

from decode_monitor.engine.fused import FusedBackend
from decode_monitor.engine.hf_backend import HFBackend
from decode_monitor.engine.sources import load_model


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def compare(model16, model32, prompt_len, steps, device, seed=0):
    """Rows of relative errors for one prompt length: the prefill, then `steps` decode steps."""
    n = prompt_len + steps + 1
    hf32, hf16 = HFBackend(model32, n), HFBackend(model16, n)
    fused = FusedBackend(model16, n)
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model16.config.vocab_size, (1, prompt_len), device=device,
                        generator=gen)
    logits = [b.prefill(ids).float() for b in (hf32, hf16, fused)]
    rows = [_row('prefill', prompt_len - 1, *logits)]
    token = logits[0].argmax(-1, keepdim=True)  # all three follow the fp32 greedy path
    for i in range(steps):
        pos = torch.tensor([prompt_len + i], device=device)
        logits = [b.forward_one(token, pos).float().clone() for b in (hf32, hf16, fused)]
        rows.append(_row('step', prompt_len + i, *logits))
        token = logits[0].argmax(-1, keepdim=True)
    del hf32, hf16, fused
    return rows


def _fp32_copy(model):
    """An fp32 copy, parameter by parameter (models loaded from GGUF refuse `.float()`)."""
    model = copy.deepcopy(model)
    for param in model.parameters():
        param.data = param.data.float()
    return model


def _row(where, pos, ref, hf16, fused):
    return {'where': where, 'pos': pos, 'hf16_vs_fp32': _rel(hf16, ref),
            'fused16_vs_fp32': _rel(fused, ref), 'fused16_vs_hf16': _rel(fused, hf16),
            'argmax_fp32_hf16_fused16': [int(x.argmax()) for x in (ref, hf16, fused)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='+', default=['qwen2.5-7b', 'llama-3-8b', 'mistral-7b'])
    ap.add_argument('--prompts', nargs='+', type=int, default=[64, 4100])
    ap.add_argument('--steps', type=int, default=4)
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--out', default='.')
    args = ap.parse_args()
    results = []
    for name in args.models:
        model16 = load_model(name, device=args.device, dtype=torch.bfloat16).model
        model32 = _fp32_copy(model16)  # before packing: an independent copy
        for n in args.prompts:
            for row in compare(model16, model32, n, args.steps, args.device):
                row['model'] = name
                results.append(row)
                print(f"{name:11s} {row['where']:7s} pos {row['pos']:5d} | vs fp32: hf bf16 "
                      f"{row['hf16_vs_fp32']:.4f} fused bf16 {row['fused16_vs_fp32']:.4f} | "
                      f"fused vs hf {row['fused16_vs_hf16']:.4f}", flush=True)
        del model16, model32
        if args.device.startswith('cuda'):
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'fused_accuracy.json'), 'w') as f:
        json.dump({'device': torch.cuda.get_device_name() if args.device != 'cpu' else 'cpu',
                   'torch': torch.__version__, 'rows': results}, f, indent=1)


if __name__ == '__main__':
    main()
