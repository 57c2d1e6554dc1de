"""Quantised weights against the same backend's unquantised ones: realised speedup vs byte ratio.

A batch-1 step is bound by memory bandwidth, so int8/int4 weights can speed it up by at most the
ratio of the bytes a step moves: bf16 bytes_per_step / quantised bytes_per_step at the same
context. That ratio is below the weights' own 2× or 4× (8× from float32), because the KV cache,
the norms and the embedding row are not quantised and the group scales add bytes. Realised /
byte ratio says how much of the possible gain the step turned into time.
"""
from collections import defaultdict
import statistics

from decode_monitor.bench import analysis
from decode_monitor.bench.grid import WEIGHTS
from decode_monitor.telemetry import stats

QUANTISED = tuple(w for w in WEIGHTS if w != 'bf16')
TITLE = 'Quantised weights: realised speedup vs byte ratio'


def speedups(results, confidence=0.95, resamples=9999):
    """One row per cell of int8/int4 weights measured beside bf16 on that backend (same model,
    ctx, mode, batch and co-runner).

    The speedup pairs each session's bf16 and quantised medians (same process, same clocks), as
    the graph speedup pairs eager and graph: what the session shares cancels out of the CI.
    """
    by_session = defaultdict(lambda: defaultdict(dict))  # cell without weights -> session -> w
    for s in analysis.ok_samples(results):
        key = analysis.cell_key(s)
        by_session[key[:4] + key[5:]][s['session']][analysis.weights_of(s)] = s
    rows = []
    keys = sorted((k[:4] + (w,) + k[4:] for k in by_session for w in QUANTISED),
                  key=analysis.sort_key)
    for seed, key in enumerate(keys):
        sessions = by_session[key[:4] + key[5:]]
        weights = key[4]
        pairs = [(v['bf16'], v[weights]) for _, v in sorted(sessions.items())
                 if 'bf16' in v and weights in v]
        if pairs:
            rows.append(_row(key, pairs, confidence, resamples, seed))
    return rows


def _row(key, pairs, confidence, resamples, seed):
    dense_ms = [analysis.session_median(d) for d, _ in pairs]
    quant_ms = [analysis.session_median(q) for _, q in pairs]
    speedup = stats.paired_ratio_ci(dense_ms, quant_ms, confidence, resamples, seed)
    dense_bytes = _mean_bytes(d for d, _ in pairs)
    quant_bytes = _mean_bytes(q for _, q in pairs)
    byte_ratio = dense_bytes / quant_bytes if dense_bytes and quant_bytes else None
    share = None
    if byte_ratio:
        # The byte ratio is analytic (no sampling error), so the share's CI is the speedup's
        # scaled by it.
        share = stats.Estimate(speedup.value / byte_ratio, speedup.lo / byte_ratio,
                               speedup.hi / byte_ratio, speedup.n)
    return {**analysis.key_dict(key), 'pairs': len(pairs),
            'bf16_ms': statistics.fmean(dense_ms), 'quantised_ms': statistics.fmean(quant_ms),
            'bf16_bytes_per_step': dense_bytes, 'quantised_bytes_per_step': quant_bytes,
            'speedup': speedup, 'byte_ratio': byte_ratio, 'share_of_byte_ratio': share}


def _mean_bytes(samples):
    values = [s.get('bytes_per_step') for s in samples]
    values = [v for v in values if v]
    return statistics.fmean(values) if values else None


def markdown_section(rows, confidence):
    """The report's section (a list of lines), empty when no quantised cell was measured."""
    if not rows:
        return []
    ci = f'{confidence:.0%} CI'
    axes = analysis.varied_axes(rows)
    names, align = analysis.key_columns(axes)
    lines = ['', f'## {TITLE}', '',
             'Realised speedup = bf16 step time / quantised step time on the same backend, '
             f'paired by session ({ci}); bf16 = unquantised, in the run\'s dtype. Byte ratio = '
             'bytes a bf16 step moves / bytes a quantised step moves at the same context (the '
             'weights as stored, the KV cache unchanged): the speedup of a purely '
             'bandwidth-bound step. Realised / byte ratio = how much of that the step achieved.',
             '',
             f'| {names} | bf16 ms/step | quantised ms/step '
             f'| realised speedup [{ci}] | byte ratio | realised / byte ratio [{ci}] | N |',
             f'|{align}|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        ratio = '—' if r['byte_ratio'] is None else f"{r['byte_ratio']:.2f}×"
        lines.append(
            f"| {analysis.key_cells(r, axes)} "
            f"| {r['bf16_ms']:.3f} | {r['quantised_ms']:.3f} "
            f"| {stats.format_ratio(r['speedup'])} | {ratio} "
            f"| {stats.format_percent(r['share_of_byte_ratio'], digits=0)} | {r['pairs']} |")
    return lines


def summary_fields(rows):
    """cell key -> the fields its summary.json row gains (the quantised cells' rows)."""
    out = {}
    for r in rows:
        speedup, share = r['speedup'], r['share_of_byte_ratio']
        out[analysis.cell_key(r)] = {
            'bf16_ms_per_step': r['bf16_ms'],
            'quantised_speedup': speedup.value,
            'quantised_speedup_ci': [speedup.lo, speedup.hi],
            'byte_ratio': r['byte_ratio'],
            'speedup_share_of_byte_ratio': None if share is None else share.value,
            'speedup_share_of_byte_ratio_ci': None if share is None else [share.lo, share.hi]}
    return out
