"""Time to first token: the bench's `prompt_tokens` axis.

For each (backend, mode, weights) of a model's cells and each prompt length P, a session times
`Decoder.generate()` from the call to the first token (the host reads it: the whole prefill,
sampling and copy included), on a cache it was told to forget: a fresh prompt of P random
tokens. The median of REPEATS such calls is the cell's TTFT; the first call at that length is
kept beside it (`ttft_first_ms`: what a request pays before the shape was ever run). A second
row times the cached-prefix case: P tokens already in the cache (the previous prompt) and
NEW_AFTER_PREFIX new ones, as a dialogue or a pinned system prompt sends them.

Floor = max(bytes / peak bandwidth, FLOPs / peak FLOP rate). bytes = the weights as stored
plus the K/V read and written (FloorModel.bytes_per_step at the last position: a prefill reads
the weights once). FLOPs = 2 x the layer matrices' weights per new token, attention's
QK^T and PV over the positions each new token sees, and lm_head once (only the last token's
logits are computed). The peak FLOP rate is the dense bf16/fp16 tensor rate of a known GPU
(PEAK_FLOPS, from the vendor's datasheet); for another device or dtype the FLOP floor is unknown
and the floor is the memory term alone (`floor_bound` says so): never a guessed rate.
"""
import random
import statistics
import time

from decode_monitor.bench.session import failure

REPEATS = 5
NEW_AFTER_PREFIX = 64
# Dense (no sparsity) bf16/fp16 tensor-core FLOP/s, by the name torch.cuda gives the device.
PEAK_FLOPS = {'NVIDIA H200': 989.5e12, 'NVIDIA H100 80GB HBM3': 989.5e12}
TENSOR_DTYPES = ('bfloat16', 'float16')


def _dims(config):
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, 'head_dim', None) or hidden // heads
    kv_heads = getattr(config, 'num_key_value_heads', None) or heads
    return hidden, heads, kv_heads, head_dim


def attention_flops(config, start, new):
    """QK^T and PV (a multiply-add each) of `new` tokens at positions start.., each over the
    keys it sees (causal: itself and everything before)."""
    _, heads, _, head_dim = _dims(config)
    seen = new * start + new * (new + 1) // 2
    return config.num_hidden_layers * 4 * heads * head_dim * seen


def prefill_flops(config, start, new):
    """FLOPs of a prefill of `new` tokens at positions start.. (logits for the last only)."""
    hidden, heads, kv_heads, head_dim = _dims(config)
    layer_weights = (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
                     + 3 * hidden * config.intermediate_size)
    return (config.num_hidden_layers * 2 * new * layer_weights + 2 * hidden * config.vocab_size
            + attention_flops(config, start, new))


def peak_flops(device, device_name, dtype):
    """The device's peak tensor FLOP/s for this dtype, or None when not known."""
    if device != 'cuda' or dtype not in TENSOR_DTYPES:
        return None
    return PEAK_FLOPS.get(device_name)


def floor(decoder, config, start, new, bandwidth, flop_rate):
    """{floor_ms, memory_floor_ms, compute_floor_ms, floor_bound, bytes, flops}."""
    moved = decoder.floor.bytes_per_step(start + new - 1)
    flops = prefill_flops(config, start, new)
    memory_ms = moved / bandwidth * 1e3
    compute_ms = flops / flop_rate * 1e3 if flop_rate else None
    if compute_ms is None:
        bound = 'memory (FLOP floor unknown on this device)'
    else:
        bound = 'compute' if compute_ms > memory_ms else 'memory'
    return {'floor_ms': max(memory_ms, compute_ms or 0.0), 'memory_floor_ms': memory_ms,
            'compute_floor_ms': compute_ms, 'floor_bound': bound, 'bytes': moved,
            'flops': flops}


def first_token_ms(decoder, prompt_ids, prefix_ids=None):
    """ms from generate() to the first token; `prefix_ids` are put in the cache first."""
    decoder.clear_prompt_cache()
    if prefix_ids:
        for _ in decoder.generate(prefix_ids, max_new_tokens=1):
            pass
    t0 = time.perf_counter()
    steps = decoder.generate(prompt_ids, max_new_tokens=1)
    next(steps)
    elapsed = (time.perf_counter() - t0) * 1e3
    steps.close()
    expected = len(prefix_ids) if prefix_ids else 0
    if decoder.last_cached_tokens != expected:
        raise RuntimeError(f'{decoder.last_cached_tokens} prompt tokens came from the cache, '
                           f'{expected} expected')
    return elapsed


def time_cell(decoder, prompt_ids, prefix_ids=None, repeats=REPEATS):
    first = first_token_ms(decoder, prompt_ids, prefix_ids)
    times = [first_token_ms(decoder, prompt_ids, prefix_ids) for _ in range(repeats)]
    return {'ttft_ms': statistics.median(times), 'ttft_ms_all': times, 'ttft_first_ms': first}


def run(session, loaded, source, cells):
    """Rows (dicts) for every (backend, mode, weights) of `cells` x the spec's prompt_tokens:
    a fresh prompt of P tokens and P cached + NEW_AFTER_PREFIX new."""
    from decode_monitor.engine.decoder import Decoder
    lengths = sorted(session.spec['prompt_tokens'])
    combos = sorted({tuple(c[1:4]) for c in cells})  # (backend, mode, weights): batch 1, alone
    bandwidth = session.peak_bandwidth or session.copy_bandwidth
    device_name = (session.torch.cuda.get_device_name() if session.device == 'cuda' else None)
    flop_rate = peak_flops(session.device, device_name, session.spec['dtype'])
    vocab = loaded.config.vocab_size
    rng = random.Random(session.spec['seed'] * 1_009 + session.index)
    prompts = {p: [rng.randrange(vocab) for _ in range(p + NEW_AFTER_PREFIX)] for p in lengths}
    max_context = lengths[-1] + NEW_AFTER_PREFIX + 1
    for backend, mode, weights in combos:
        base = {'model': source, 'backend': backend, 'mode': mode, 'weights': weights,
                'session': session.index, 'repeats': REPEATS, 'max_context': max_context,
                'peak_flops': flop_rate, 'bandwidth': bandwidth,
                'bandwidth_source': 'peak' if session.peak_bandwidth else 'copy'}
        decoder = None
        try:
            decoder = Decoder(loaded, mode=mode, backend=backend, max_context=max_context,
                              weights=weights, kernel_configs=session.spec.get('kernel_configs'))
            base['mode_used'] = decoder.mode
            base['prefill_fallback_reason'] = decoder.prefill_fallback_reason
            for p in lengths:
                ids = prompts[p]
                for start, new in ((0, p), (p, NEW_AFTER_PREFIX)):
                    row = dict(base, prompt_tokens=start + new, cached_tokens=start)
                    yield _timed(row, decoder, loaded.config, ids[:start + new], ids[:start],
                                 bandwidth, flop_rate)
        except Exception as exc:  # the decoder could not be built: every row says why
            why = failure(exc, with_traceback=False)
            for p in lengths:
                for start, new in ((0, p), (p, NEW_AFTER_PREFIX)):
                    yield dict(base, prompt_tokens=start + new, cached_tokens=start, **why)
        finally:
            del decoder


def _timed(row, decoder, config, prompt_ids, prefix_ids, bandwidth, flop_rate):
    try:
        row.update(time_cell(decoder, prompt_ids, prefix_ids))
        row.update(floor(decoder, config, len(prefix_ids), len(prompt_ids) - len(prefix_ids),
                         bandwidth, flop_rate))
        row['fraction_of_floor'] = row['floor_ms'] / row['ttft_ms']
        row['status'] = 'ok'
    except Exception as exc:
        row.update(failure(exc))
    return row


def markdown_section(rows):
    """The report's TTFT table (empty without rows)."""
    if not rows:
        return []
    lines = ['', '## Time to first token (prompt_tokens)', '',
             f'generate() to the first token on the host, median of {REPEATS} fresh calls '
             '(first: the first call at that length). Floor = max(weights + K/V bytes / '
             'bandwidth, prefill FLOPs / peak tensor FLOP rate); cached = prompt tokens already '
             'in the cache.', '',
             '| model | backend | mode | weights | prompt tokens | cached | TTFT ms | first ms '
             '| floor ms | bound | % of floor |',
             '|---|---|---|---|---:|---:|---:|---:|---:|---|---:|']
    key = (lambda r: (r['model'], r['backend'], r['mode'], r['weights'], r['cached_tokens'] > 0,
                      r['prompt_tokens'], r['session']))
    for r in sorted(rows, key=key):
        cells = (f"| {r['model']} | {r['backend']} | {r['mode']} | {r['weights']} "
                 f"| {r['prompt_tokens']} | {r['cached_tokens']} ")
        if r.get('status') != 'ok':
            lines.append(cells + f"| {r.get('status')}: {r.get('reason')} | | | | |")
            continue
        lines.append(cells + f"| {r['ttft_ms']:.2f} | {r['ttft_first_ms']:.2f} "
                     f"| {r['floor_ms']:.3f} | {r['floor_bound']} "
                     f"| {100 * r['fraction_of_floor']:.1f} |")
    return lines
