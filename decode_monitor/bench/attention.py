"""`bench attention`: attention time per layer at the decode shape, by implementation.

    bench attention [--model M] [--contexts CTX ..] [--dtype D] [--device D] [--iters N]
                    [-o FILE.json]

One query token against ctx cached tokens, in a model's attention shape (query heads, KV heads,
head dim, layers: a preset, a checkpoint directory or a .gguf file, no weights read), for

    sdpa-math, sdpa-efficient, sdpa-flash, sdpa-cudnn
        torch's scaled_dot_product_attention pinned to one backend (torch.nn.attention
        .sdpa_kernel). GQA as `enable_gqa=True` where the backend takes it, else with K/V
        repeated to the query heads beforehand, as transformers hands them over (`gqa` says
        which; the repeat itself is not timed);
    flash-decoding
        our split-K kernel (engine/fused/attention.py), with this GPU's kernel-config table.

Every layer has its own K/V, as in a real step, so no call finds its K/V in a cache the previous
call warmed; time per layer = one pass over all layers / layers. On a GPU the pass is captured in
a CUDA graph and replayed (device time without launch gaps, CUDA events; eager-timed when
capture fails, said in `timing`); on a CPU it is wall clock. The figure is the median pass.
Each implementation's output for layer 0 is checked against sdpa-math in float32
(`max_abs_err`). One that cannot run here (no kernel for this device, dtype or shape; Triton
without a GPU) is listed as unavailable with the reason.
"""
import argparse
import statistics
import sys
import time
import warnings

from decode_monitor.bench.grid import DEVICES, DTYPES
from decode_monitor.bench.verdict import ATTENTION_FORMAT as FORMAT
SDPA = {'sdpa-math': 'MATH', 'sdpa-efficient': 'EFFICIENT_ATTENTION',
        'sdpa-flash': 'FLASH_ATTENTION', 'sdpa-cudnn': 'CUDNN_ATTENTION'}
IMPLEMENTATIONS = tuple(SDPA) + ('flash-decoding',)
DEFAULT_CONTEXTS = (2048, 4096, 8192, 16384)


class Unavailable(RuntimeError):
    """The implementation cannot run here; the message says why."""


def attention_shape(model):
    """{q_heads, kv_heads, head_dim, layers} of a model (its config only)."""
    from decode_monitor.bench import memory
    config = memory.model_config(model)
    shape = memory.shape_from_config(config, 0)
    return {'q_heads': shape.heads, 'kv_heads': shape.kv_heads, 'head_dim': shape.head_dim,
            'layers': shape.layers}


def _first_line(exc, caught=()):
    """The reason an implementation failed: the exception's first line, and torch's warnings
    (they say why each SDPA backend refused)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ''
    notes = []
    for w in caught:
        line = str(w.message).strip().splitlines()[0]
        if line not in notes:
            notes.append(line)
    return '; '.join([f'{type(exc).__name__}: {text}'] + notes)[:600]


class Inputs:
    """Q, and K/V per layer, of the decode shape at one context length."""

    def __init__(self, shape, ctx, dtype, device, seed=0):
        import torch
        gen = torch.Generator(device=device).manual_seed(seed)
        h, kvh, d, layers = (shape['q_heads'], shape['kv_heads'], shape['head_dim'],
                             shape['layers'])
        self.shape, self.ctx, self.device, self.dtype = shape, ctx, device, dtype

        def randn(*size):
            return torch.randn(*size, generator=gen, device=device).to(dtype)
        self.q = randn(1, h, 1, d)
        self.k = [randn(1, kvh, ctx, d) for _ in range(layers)]
        self.v = [randn(1, kvh, ctx, d) for _ in range(layers)]

    def reference(self):
        """Layer 0's attention in float32 through the math backend."""
        import torch
        import torch.nn.functional as F
        group = self.shape['q_heads'] // self.shape['kv_heads']
        k = self.k[0].float().repeat_interleave(group, dim=1)
        v = self.v[0].float().repeat_interleave(group, dim=1)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return F.scaled_dot_product_attention(self.q.float(), k, v).reshape(-1)


def sdpa_calls(inputs, backend_name):
    """(one call per layer, gqa mode) for an SDPA backend; Unavailable if it cannot run."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)
    q = inputs.q
    group = inputs.shape['q_heads'] // inputs.shape['kv_heads']

    def make(ks, vs, **kw):
        def call(layer):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, ks[layer], vs[layer], **kw)
        return call
    reasons = []
    variants = [('native', lambda: make(inputs.k, inputs.v, enable_gqa=True))]
    if group > 1:
        variants.append(('repeated', lambda: make(
            [k.repeat_interleave(group, dim=1) for k in inputs.k],
            [v.repeat_interleave(group, dim=1) for v in inputs.v])))
    for gqa, build in variants:
        call = build()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            try:
                call(0)
                if inputs.device == 'cuda':
                    torch.cuda.synchronize()
                return call, gqa if group > 1 else None
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                reasons.append((gqa, _first_line(exc, caught)))
        del call
    if len({r for _, r in reasons}) == 1:
        raise Unavailable(reasons[0][1])
    raise Unavailable(' | '.join(f'{gqa} GQA: {r}' for gqa, r in reasons))


def flash_decoding_calls(inputs):
    """One call per layer of our split-K kernel over the same K/V (cache layout (kv, T, D))."""
    import torch
    try:
        from decode_monitor.engine.fused.attention import DecodeAttention
        from decode_monitor.engine.fused.tables import resolve
        s = inputs.shape
        group = s['q_heads'] // s['kv_heads']
        config = resolve(None, torch.device(inputs.device)).attention(
            s['kv_heads'], group, inputs.ctx)
        attention = DecodeAttention(s['q_heads'], s['kv_heads'], s['head_dim'], inputs.ctx,
                                    inputs.device, config=config)
        q = inputs.q.reshape(-1).contiguous()
        ks = [k[0] for k in inputs.k]  # (kv_heads, ctx, D), contiguous
        vs = [v[0] for v in inputs.v]
        pos = torch.tensor([inputs.ctx - 1], dtype=torch.long, device=inputs.device)
        out = torch.empty_like(q)

        def call(layer):
            return attention(q, ks[layer], vs[layer], pos, out)
        call(0)
        if inputs.device == 'cuda':
            torch.cuda.synchronize()
        return call, 'native'
    except Exception as exc:  # no Triton, no GPU for it, a shape it does not take
        raise Unavailable(_first_line(exc)) from None


def time_pass(call, layers, device, iters, warmup=3):
    """-> (median µs per layer, timing): one pass = one call per layer."""
    import torch

    def one_pass():
        for layer in range(layers):
            call(layer)
    if device != 'cuda':
        for _ in range(warmup):
            one_pass()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            one_pass()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6 / layers, 'wall'
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            one_pass()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    run, timing = one_pass, 'eager'
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one_pass()
        graph.replay()
        torch.cuda.synchronize()
        run, timing = graph.replay, 'graph'
    except Exception:  # capture fails in many ways; then the launches are timed too
        torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for i in range(iters):
        run()
        events[i + 1].record()
    events[-1].synchronize()
    times = [events[i].elapsed_time(events[i + 1]) for i in range(iters)]
    return statistics.median(times) * 1e3 / layers, timing


def measure(model, contexts, dtype='bfloat16', device='cuda', iters=50,
            implementations=IMPLEMENTATIONS, progress=None):
    """One row per (implementation, ctx): status ok (us_per_layer, timing, gqa, max_abs_err)
    or unavailable (reason)."""
    import torch
    shape = attention_shape(model)
    torch_dtype = getattr(torch, dtype)
    rows = []
    for ctx in contexts:
        inputs = Inputs(shape, ctx, torch_dtype, device)
        reference = inputs.reference()
        for impl in implementations:
            row = {'impl': impl, 'ctx': ctx}
            try:
                if impl in SDPA:
                    call, gqa = sdpa_calls(inputs, SDPA[impl])
                else:
                    call, gqa = flash_decoding_calls(inputs)
                error = (call(0).reshape(-1).float() - reference).abs().max().item()
                us, timing = time_pass(call, shape['layers'], device, iters)
                row.update(status='ok', us_per_layer=us, timing=timing, gqa=gqa,
                           max_abs_err=error)
            except Unavailable as exc:
                row.update(status='unavailable', reason=str(exc))
            except torch.cuda.OutOfMemoryError as exc:
                row.update(status='unavailable', reason=_first_line(exc))
            finally:
                call = None
                if device == 'cuda':
                    torch.cuda.empty_cache()
            rows.append(row)
            if progress:
                progress(row)
        del inputs
    return shape, rows


def table(result):
    """Markdown: µs per layer, one row per context, one column per implementation."""
    impls = list(dict.fromkeys(r['impl'] for r in result['rows']))
    lines = ['| ctx | ' + ' | '.join(impls) + ' |', '|---:|' + '---:|' * len(impls)]
    for ctx in sorted({r['ctx'] for r in result['rows']}):
        by = {r['impl']: r for r in result['rows'] if r['ctx'] == ctx}
        cells = [f"{by[i]['us_per_layer']:.2f}" if by.get(i, {}).get('status') == 'ok'
                 else 'unavailable' for i in impls]
        lines.append(f'| {ctx} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _parser():
    p = argparse.ArgumentParser(
        prog='bench attention', description='Attention time per layer at the decode shape '
        '(1 query token, ctx cached tokens) for SDPA\'s math, memory-efficient, flash and '
        'cuDNN backends and the flash-decoding kernel; writes JSON.')
    p.add_argument('--model', default='qwen2.5-7b',
                   help='preset, checkpoint directory or .gguf file: its attention shape')
    p.add_argument('--contexts', nargs='+', type=int, default=list(DEFAULT_CONTEXTS),
                   metavar='CTX')
    p.add_argument('--dtype', default='auto', choices=DTYPES)
    p.add_argument('--device', default='auto', choices=DEVICES)
    p.add_argument('--iters', type=int, default=50, help='timed passes over the layers')
    p.add_argument('--impls', nargs='+', choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    p.add_argument('-o', '--output', default='attention.json', help='JSON file to write')
    return p


def main(argv):
    from decode_monitor.bench.grid import GridError
    from decode_monitor.bench.report import write_json
    from decode_monitor.bench.run import environment, resolve_device
    args = _parser().parse_args(argv)
    for i, ctx in enumerate(args.contexts):
        if ctx < 1:
            raise GridError(f'--contexts[{i}]: expected a positive integer, got {ctx}')
    if args.iters < 1:
        raise GridError(f'--iters: expected a positive integer, got {args.iters}')
    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != 'auto' else (
        'bfloat16' if device == 'cuda' else 'float32')
    try:
        shape = attention_shape(args.model)
    except Exception as exc:
        raise GridError(f'--model: {args.model!r}: {exc}') from None
    result = {'format': FORMAT, 'environment': environment(device, ['attention'] + argv),
              'model': args.model, 'shape': shape, 'dtype': dtype, 'iters': args.iters,
              'rows': [], 'partial': True}
    write_json(args.output, result)

    def progress(row):  # every row is written at once: an interruption keeps them
        result['rows'].append(row)
        write_json(args.output, result)
        what = (f"{row['us_per_layer']:.2f} us/layer ({row['timing']})"
                if row['status'] == 'ok' else f"unavailable: {row['reason'][:120]}")
        print(f"ctx {row['ctx']:>6} {row['impl']:<15} {what}", file=sys.stderr, flush=True)
    measure(args.model, args.contexts, dtype, device, args.iters, tuple(args.impls), progress)
    result['partial'] = False
    write_json(args.output, result)
    print(table(result))
    print(f'output: {args.output}')
    return 0
