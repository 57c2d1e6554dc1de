"""Quality of int8 / int4 weights against bf16 on a real model (SmolLM2-135M-Instruct, CPU).

The reference is transformers' own `generate()` (greedy, bf16): for each prompt it writes
`--tokens` new tokens (end-of-sequence suppressed so every prompt gives the full count). Each
quantised model then reads that same sequence (teacher forcing) and, at each generated position,
we compare its greedy choice with the reference token and its next-token distribution with the
bf16 model's (KL(bf16 || quantised), nats). The unquantised fused backend is measured the same
way, so what is owed to quantisation and what to the implementation can be told apart.

    python benchmarks/quant_quality.py --tokens 256 --out benchmarks/results/cpu/quant_quality.json
"""
import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

PROMPTS = (
    'What is the capital of France?',
    'Explain in three sentences how a robot vacuum finds its way around a room.',
    'Write a short poem about the sea.',
    'List five safety rules for working next to an industrial robot arm.',
)
FORMATS = ('bf16', 'int8', 'int4')


def reference_sequence(loaded, prompt, tokens):
    """Prompt ids and transformers' greedy continuation of `tokens` tokens, in one (1, T)."""
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{'role': 'user', 'content': prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=tokens, min_new_tokens=tokens,
                                pad_token_id=tok.eos_token_id)
    return out, ids.shape[1]


def compare(reference_logits, logits, sequence, prompt_len):
    """Agreement with the reference tokens and KL(reference || this) over generated positions."""
    span = slice(prompt_len - 1, sequence.shape[1] - 1)  # logits that chose each new token
    ref, got = reference_logits[span].float(), logits[span].float()
    targets = sequence[0, prompt_len:]
    kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                  reduction='none').sum(-1)
    return {'positions': int(targets.numel()),
            'greedy_agreement': float((got.argmax(-1) == targets).float().mean()),
            'kl_mean': float(kl.mean()), 'kl_p95': float(kl.quantile(0.95)),
            'kl_max': float(kl.max())}


def evaluate(loaded, prompts, tokens, formats=FORMATS):
    """Per format: each prompt's metrics, and their pooled means."""
    from decode_monitor.engine.fused import FusedBackend
    model = loaded.model
    sequences = [reference_sequence(loaded, p, tokens) for p in prompts]
    longest = max(s.shape[1] for s, _ in sequences)
    with torch.no_grad():
        references = [model(input_ids=s).logits[0] for s, _ in sequences]  # bf16 hf forward
    results = {}
    for fmt in formats:
        t0 = time.time()
        backend = FusedBackend(model, longest, use_triton=False, weights=fmt)
        floor = backend.floor_model()
        rows = []
        for (seq, n), ref in zip(sequences, references):
            rows.append(compare(ref, backend.logits_at_every_position(seq), seq, n))
        del backend
        total = sum(r['positions'] for r in rows)
        results[fmt] = {
            'weight_bytes': floor.weight_bytes,
            'greedy_agreement': sum(r['greedy_agreement'] * r['positions'] for r in rows) / total,
            'kl_mean': sum(r['kl_mean'] * r['positions'] for r in rows) / total,
            'kl_max': max(r['kl_max'] for r in rows), 'prompts': rows,
            'seconds': time.time() - t0}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tokens', type=int, default=256)
    parser.add_argument('--prompts', type=int, default=len(PROMPTS))
    parser.add_argument('--out', help='write the JSON here')
    args = parser.parse_args(argv)
    import transformers
    from decode_monitor.engine.sources import load_model
    torch.manual_seed(0)
    loaded = load_model(dtype=torch.bfloat16)
    results = evaluate(loaded, PROMPTS[:args.prompts], args.tokens)
    print(f'{"weights":8} {"bytes/step":>12} {"vs bf16":>8} {"greedy agree":>13} '
          f'{"KL mean":>9} {"KL max":>8}')
    for fmt, r in results.items():
        ratio = results['bf16']['weight_bytes'] / r['weight_bytes']
        print(f'{fmt:8} {r["weight_bytes"]:12d} {ratio:7.2f}x {r["greedy_agreement"]:12.1%} '
              f'{r["kl_mean"]:9.4f} {r["kl_max"]:8.3f}')
    if args.out:
        env = {'torch': torch.__version__, 'transformers': transformers.__version__,
               'python': sys.version.split()[0], 'machine': platform.machine(),
               'model': loaded.name, 'dtype': 'bfloat16', 'device': 'cpu'}
        with open(args.out, 'w') as f:
            json.dump({'command': 'python benchmarks/quant_quality.py ' + ' '.join(
                argv if argv is not None else sys.argv[1:]), 'tokens': args.tokens,
                'prompts': list(PROMPTS[:args.prompts]), 'environment': env,
                'results': results}, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
