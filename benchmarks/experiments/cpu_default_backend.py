"""Which backend should a CPU run pick by default? SmolLM2 greedy, 64 new tokens, on this CPU:
our decoder with backend hf (transformers' forward over a StaticCache) and backend fused (its
torch path on a CPU), beside transformers' own generate() (DynamicCache) in the same run.

Rounds alternate the three, so a busy machine slows all of them alike; the figure is the
median over rounds of (whole generation wall time) / new tokens. Tokens are compared with
generate()'s as a check that the three decode the same thing.

    python benchmarks/experiments/cpu_default_backend.py [--rounds 7] [-o result.json]
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch
import transformers

from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.factory import DecoderSettings
from decode_monitor.engine.sampling import SamplingParams
from decode_monitor.engine.sources import load_model

PROMPT = 'Write a short story about a robot that learns to paint.'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--tokens', type=int, default=64)
    parser.add_argument('-o', '--output')
    args = parser.parse_args()
    loaded = load_model('smollm2')
    ids = loaded.tokenizer.apply_chat_template([{'role': 'user', 'content': PROMPT}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    decoders = {b: Decoder(loaded, mode='eager', backend=b, max_context=2048)
                for b in ('hf', 'fused')}

    def ours(backend):
        out = [s.token for s in decoders[backend].generate(ids, SamplingParams(), args.tokens)]
        return out

    def reference():
        with torch.no_grad():
            out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=args.tokens,
                                        do_sample=False, min_new_tokens=args.tokens)
        return out[0, len(ids):].tolist()

    runs = {'hf': lambda: ours('hf'), 'fused': lambda: ours('fused'), 'generate': reference}
    times = {name: [] for name in runs}
    tokens = {}
    for name, run in runs.items():  # warm-up, and the tokens
        tokens[name] = run()
    for _ in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1e3 / args.tokens)
    n = min(len(t) for t in tokens.values())
    result = dict(
        default_backend=DecoderSettings().resolved_backend('cpu'),
        ms_per_token={k: round(statistics.median(v), 2) for k, v in times.items()},
        rounds=times, same_tokens_as_generate={
            k: tokens[k][:n] == tokens['generate'][:n] for k in ('hf', 'fused')},
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                     torch=torch.__version__, transformers=transformers.__version__,
                     threads=torch.get_num_threads()),
        command='python benchmarks/experiments/cpu_default_backend.py --rounds '
                f'{args.rounds} --tokens {args.tokens}')
    if args.output:
        with open(args.output, 'w') as f:
            json.dump(result, f, indent=1)
    print(f'{"backend":10} {"ms/token":>9}')
    for name, ms in result['ms_per_token'].items():
        print(f'{name:10} {ms:9.2f}')
    print('same tokens as generate():', result['same_tokens_as_generate'])


if __name__ == '__main__':
    main()
