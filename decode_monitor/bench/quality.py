"""`bench quality`: how closely a backend and weight format follow transformers on one model.

    bench quality [--model M] [--backends fused hf] [--weights bf16 int8 int4] [--tokens N] ...

The reference is transformers itself: its greedy `generate()` writes `--tokens` new tokens after
each prompt (end-of-sequence suppressed, so every prompt gives the full count), and its forward
over the whole sequence gives the reference logits. Each backend and weight format then reads that
same sequence teacher-forced through the decoder's own path, the prefill of the prompt and then
one decode step (`forward_one`, what a served step runs) per generated token. At every generated
position it is scored on greedy agreement (its argmax is the reference token), KL(reference ||
it) in nats, and the relative logit error ||logits - reference|| / ||reference||.

Two implementations in bf16 never agree exactly (each rounds its own way, and a deep model
amplifies it), so `--reference-dtype float32` takes the reference from a float32 copy of the
model and adds transformers in the model's dtype as a row of its own: what the dtype costs and
what the implementation adds can then be told apart. On a CPU the fused backend runs its torch
path; on a GPU its Triton kernels.
"""
import argparse
import copy
import json
import sys
import time

PROMPTS = (
    'What is the capital of France?',
    'Explain in three sentences how a robot vacuum finds its way around a room.',
    'Write a short poem about the sea.',
    'List five safety rules for working next to an industrial robot arm.',
)
FORMAT = 'decode_monitor.bench.quality/1'
REFERENCE = 'transformers'  # the row of transformers in the model's dtype (float32 reference)


def parser():
    from decode_monitor.bench.grid import DEVICES, DTYPES, WEIGHTS
    p = argparse.ArgumentParser(
        prog='bench quality', description='Greedy agreement, KL and logit error of each backend '
        'and weight format against transformers, on one model, teacher-forced on '
        "transformers' own greedy continuation of a few prompts.")
    p.add_argument('--model', default='smollm2',
                   help="'smollm2' (default), a preset, a checkpoint directory or a .gguf file")
    p.add_argument('--backends', nargs='+', default=['fused'], help='backends to score')
    p.add_argument('--weights', nargs='+', default=list(WEIGHTS), choices=WEIGHTS,
                   help='weight formats (bf16: unquantised, the model dtype; int8/int4: fused)')
    p.add_argument('--device', default='auto', choices=DEVICES)
    p.add_argument('--dtype', default='auto', choices=DTYPES,
                   help='model dtype (auto: bfloat16 on a GPU, float32 on a CPU)')
    p.add_argument('--reference-dtype', default='same', choices=('same', 'float32'),
                   help='dtype of the transformers reference (float32: a float32 copy)')
    p.add_argument('--tokens', type=int, default=64, help='generated tokens per prompt')
    p.add_argument('--prompts', type=int, default=len(PROMPTS), help='how many prompts')
    p.add_argument('--prompt-tokens', type=int, metavar='N',
                   help='random prompts of N token ids (a long context) instead of the texts')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('-o', '--output', help='write the results as JSON to this file')
    return p


class QualityError(ValueError):
    """The run cannot be made as asked (bad combination, model that does not load)."""


def pairs(backends, weights):
    """(backend, weights) rows to score; a format no listed backend serves is an error."""
    from decode_monitor.bench.grid import pairs_with, registered_backends
    known = registered_backends()
    for b in backends:
        if b not in known:
            raise QualityError(f'backend {b!r}: expected one of {", ".join(known)}')
    for w in weights:
        if not any(pairs_with(b, w) for b in backends):
            raise QualityError(f'weights {w} need backend fused in --backends')
    return [(b, w) for b in backends for w in weights if pairs_with(b, w)]


def prompt_ids(loaded, count, prompt_tokens=None, seed=0):
    """Token id lists: the chat-templated texts, or random ids of `prompt_tokens` tokens."""
    import torch
    if prompt_tokens:
        gen = torch.Generator().manual_seed(seed)
        vocab = loaded.config.vocab_size
        return [torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist()
                for _ in range(count)]
    tok = loaded.tokenizer
    out = []
    for text in (PROMPTS * (count // len(PROMPTS) + 1))[:count]:
        if getattr(tok, 'chat_template', None):
            text = tok.apply_chat_template([{'role': 'user', 'content': text}], tokenize=False,
                                           add_generation_prompt=True)
        out.append(list(tok.encode(text, add_special_tokens=False)))
    return out


def reference_sequence(model, ids, tokens, pad_token_id):
    """transformers' greedy continuation: (1, len(ids) + tokens) ids."""
    import torch
    ids = torch.tensor([ids], device=model.device)
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=tokens, min_new_tokens=tokens,
                          pad_token_id=pad_token_id)


def decoder_logits(backend, sequence, prompt_len):
    """Teacher-forced logits (generated positions, vocab) fp32 through the decode path."""
    import torch
    device = sequence.device
    rows = [backend.prefill(sequence[:, :prompt_len], 0).float()]
    token = torch.empty((1, 1), dtype=torch.long, device=device)
    pos = torch.empty(1, dtype=torch.long, device=device)
    for p in range(prompt_len, sequence.shape[1] - 1):
        token.fill_(int(sequence[0, p]))
        pos.fill_(p)
        rows.append(backend.forward_one(token, pos).float().clone())  # a static buffer on GPU
    return torch.cat(rows)


def scores(reference, logits, targets, suppressed=()):
    """Per position: agreement with the targets, KL(reference || logits), relative error.

    suppressed: token ids the reference could not choose (end of sequence, held back so that
    every prompt gives the full count); the greedy choice is taken without them too.
    """
    import torch.nn.functional as F
    ref, got = reference.double(), logits.double()  # float64: rounding stays out of the KL
    kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                  reduction='none').sum(-1).clamp_min(0)  # >= 0: what rounding leaves below
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    choice = got.clone()
    choice[:, list(suppressed)] = float('-inf')
    return (choice.argmax(-1) == targets).float(), kl, rel


def summary(parts, weight_bytes=None):
    """Pool the per-prompt position scores of one row."""
    import torch
    agree, kl, rel = (torch.cat([p[i] for p in parts]).cpu() for i in range(3))
    return {'positions': int(agree.numel()), 'weight_bytes': weight_bytes,
            'greedy_agreement': float(agree.mean()), 'kl_mean': float(kl.mean()),
            'kl_p95': float(kl.quantile(0.95)), 'kl_max': float(kl.max()),
            'logit_error_mean': float(rel.mean()), 'logit_error_max': float(rel.max()),
            'prompts': [{'positions': int(a.numel()), 'greedy_agreement': float(a.mean()),
                         'kl_mean': float(k.mean()), 'logit_error_mean': float(r.mean())}
                        for a, k, r in parts]}


def _fp32_copy(model):
    """A float32 copy, parameter by parameter (models loaded from GGUF refuse `.float()`)."""
    model = copy.deepcopy(model)
    for param in model.parameters():
        param.data = param.data.float()
    return model


def evaluate(loaded, rows, prompts, tokens, reference_dtype='same'):
    """Score each (backend, weights) of `rows` on `loaded`; -> list of result dicts."""
    import torch
    from decode_monitor.engine.decoder import Decoder
    model = loaded.model
    upcast = reference_dtype == 'float32' and model.dtype != torch.float32
    ref_model = _fp32_copy(model) if upcast else model
    eos = model.generation_config.eos_token_id
    suppressed = [i for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None]
    pad = getattr(loaded.tokenizer, 'eos_token_id', None)
    pad = (suppressed or [0])[0] if pad is None else pad
    with torch.no_grad():
        sequences = [(reference_sequence(ref_model, ids, tokens, pad), len(ids))
                     for ids in prompts]
        references = [ref_model(input_ids=s).logits[0, n - 1:-1].float() for s, n in sequences]
        own = None
        if ref_model is not model:
            own = [model(input_ids=s).logits[0, n - 1:-1] for s, n in sequences]
    if ref_model is not model:
        del ref_model
    longest = max(s.shape[1] for s, _ in sequences)
    results = []
    if own is not None:
        parts = [scores(r, o, s[0, n:], suppressed)
                 for r, o, (s, n) in zip(references, own, sequences)]
        results.append({'backend': REFERENCE, 'weights': 'bf16', **summary(parts)})
    for backend, weights in rows:
        t0 = time.perf_counter()
        decoder = Decoder(loaded, mode='eager', backend=backend, max_context=longest,
                          weights=weights)
        with torch.no_grad():
            parts = [scores(r, decoder_logits(decoder.backend, s, n), s[0, n:], suppressed)
                     for r, (s, n) in zip(references, sequences)]
        results.append({'backend': backend, 'weights': weights,
                        **summary(parts, decoder.floor.weight_bytes),
                        'seconds': time.perf_counter() - t0})
        del decoder
    return results


def table(results):
    lines = ['| backend | weights | weight bytes | greedy agreement | KL mean | KL p95 | KL max '
             '| logit err mean | logit err max |', '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in results:
        nbytes = f"{r['weight_bytes']:,}" if r['weight_bytes'] else '-'
        lines.append(f"| {r['backend']} | {r['weights']} | {nbytes} | "
                     f"{r['greedy_agreement']:.2%} | {r['kl_mean']:.2e} | {r['kl_p95']:.2e} | "
                     f"{r['kl_max']:.2e} | {r['logit_error_mean']:.2e} | "
                     f"{r['logit_error_max']:.2e} |")
    return '\n'.join(lines)


def main(argv):
    """Entry of `bench quality`; exit code 0, or 2 for a usage error."""
    args = parser().parse_args(argv)
    for name in ('tokens', 'prompts', 'prompt_tokens'):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise QualityError(f"--{name.replace('_', '-')}: expected a positive integer, "
                               f'got {value}')
    import torch
    from decode_monitor.bench.run import environment
    from decode_monitor.engine.sources import ModelLoadError, load_model
    rows = pairs(args.backends, args.weights)
    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif device == 'cuda' and not torch.cuda.is_available():
        raise QualityError('--device cuda: torch sees no CUDA device')
    dtype = args.dtype if args.dtype != 'auto' else (
        'bfloat16' if device == 'cuda' else 'float32')
    torch.manual_seed(args.seed)
    try:
        loaded = load_model(args.model, device=device, dtype=getattr(torch, dtype))
    except ModelLoadError as exc:
        raise QualityError(str(exc)) from None
    prompts = prompt_ids(loaded, args.prompts, args.prompt_tokens, args.seed)
    results = evaluate(loaded, rows, prompts, args.tokens, args.reference_dtype)
    reference = dtype if args.reference_dtype == 'same' else 'float32'
    print(f'{loaded.name} on {device}, {dtype}; reference: transformers {reference}, greedy; '
          f'{len(prompts)} prompts x {args.tokens} tokens')
    print(table(results))
    if args.output:
        record = {'format': FORMAT, 'environment': environment(device, ['quality'] + argv),
                  'model': loaded.name, 'dtype': dtype, 'reference_dtype': reference,
                  'tokens': args.tokens, 'prompts': prompts, 'results': results}
        with open(args.output, 'w', encoding='utf-8') as f:
            json.dump(record, f, indent=1)
            f.write('\n')
        print(f'written: {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
