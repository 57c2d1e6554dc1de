"""Hardware qualification: thresholds and an optional reference profile -> pass/fail.

A cell fails when its mean achieved fraction of the floor is under the mode's minimum, its mean
step time is over the maximum, the GPU reported power or thermal throttling during it (unless
allowed), any of its sessions failed, or it is slower than the reference by more than the
tolerance (the CI of the ratio lies wholly above 1 + tolerance). Cells skipped because they
cannot fit are reported, not failed. The run passes when at least one cell was measured and no
cell failed.

A reference is a results.json measured on the same device model, or `shipped`: the study grid as
measured on a known-good GPU of this model, shipped as package data (`references/<gpu>.json`),
so that a robot can be qualified against it without a second machine.
"""
import glob
import json
import os

from decode_monitor.bench import analysis
from decode_monitor.telemetry import stats

PASS, FAIL, USAGE = 0, 1, 2
SHIPPED = 'shipped'
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'references')
ATTENTION_FORMAT = 'decode_monitor.bench.attention/1'  # bench attention's files (attention.py)


class VerdictUsageError(ValueError):
    """The verdict cannot be formed as asked (unreadable or mismatched reference)."""


def load_results(path):
    try:
        with open(path, encoding='utf-8') as f:
            results = json.load(f)
    except OSError as exc:
        raise VerdictUsageError(f'cannot read {path}: {exc.strerror}') from None
    except json.JSONDecodeError as exc:
        raise VerdictUsageError(f'{path}: not JSON: {exc}') from None
    if isinstance(results, dict) and results.get('format') == ATTENTION_FORMAT:
        raise VerdictUsageError(f'{path}: a `bench attention` file, not a bench results.json')
    if not isinstance(results, dict) or 'samples' not in results:
        raise VerdictUsageError(f'{path}: not a bench results.json (no "samples")')
    return results


def load_run(path):
    """A bench results.json or a `bench attention` file (its "format" tells them apart)."""
    try:
        return load_results(path)
    except VerdictUsageError:
        try:
            with open(path, encoding='utf-8') as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and data.get('format') == ATTENTION_FORMAT:
            return data
        raise


def device_name(results):
    return (results.get('environment') or {}).get('device_name')


def shipped_references():
    """{device model: path} of the reference profiles that ship with the package."""
    out = {}
    for path in sorted(glob.glob(os.path.join(REFERENCE_DIR, '*.json'))):
        name = device_name(load_results(path))
        if name:
            out[name] = path
    return out


def reference_path(spec, mine):
    """A path given as is; `shipped` -> the shipped profile for device model `mine`."""
    if spec != SHIPPED:
        return spec
    shipped = shipped_references()
    if mine is None:
        raise VerdictUsageError('reference shipped: the device model of this run cannot be told '
                                '(no NVML), so no shipped profile can be matched to it')
    if mine not in shipped:
        known = ', '.join(repr(k) for k in shipped) or 'none'
        raise VerdictUsageError(
            f'reference shipped: no reference profile ships for {mine!r} (shipped: {known}); '
            "pass the results.json of a known-good GPU of this model instead")
    return shipped[mine]


def load_reference(path, mine):
    """Read a reference profile for a run on device model `mine`, or refuse it.

    Called before the first session: a reference that cannot be used must not cost a run.
    """
    path = reference_path(path, mine)
    reference = load_results(path)
    theirs = device_name(reference)
    if not theirs:
        raise VerdictUsageError(f'reference {path}: it does not say which device measured it '
                                '(no environment.device_name)')
    if mine is None:
        raise VerdictUsageError(f'reference {path}: the device model of this run cannot be '
                                'told (no NVML), so a reference cannot be matched to it')
    if mine != theirs:
        raise VerdictUsageError(
            f'reference {path} was measured on {theirs!r}, this run is on {mine!r}: a '
            'reference must come from the same device model')
    return reference


def evaluate(results, thresholds, reference=None, confidence=0.95, resamples=9999,
             cells=None):
    """-> {'passed', 'cells': [...], 'reasons': [...], 'reference': {...} or None}."""
    cells = cells if cells is not None else analysis.cell_stats(results, confidence, resamples)
    ref_medians = None
    ref_info = None
    if reference is not None:
        mine, theirs = device_name(results), device_name(reference)
        if mine != theirs:
            raise VerdictUsageError(
                f'the reference profile was measured on {theirs!r}, this run on {mine!r}: '
                'a reference must come from the same device model')
        ref_medians = _medians(reference)
        ref_info = {'device_name': theirs,
                    'created': (reference.get('environment') or {}).get('created'),
                    'tolerance': thresholds.reference_tolerance}
    errors = {}
    for s in analysis.failed_samples(results):
        errors.setdefault(analysis.cell_key(s), []).append(
            f"session {s['session']}: {s.get('reason')}")
    rows = []
    for seed, cell in enumerate(cells):
        key = analysis.cell_key(cell)
        reasons = [f'error in {e}' for e in errors.pop(key, [])]
        reasons += _threshold_reasons(cell, thresholds)
        row = analysis.key_dict(key)
        row['ms_per_step'] = cell['ms_per_step'].value
        if ref_medians is not None:
            mine = cell['session_medians_ms']
            if key in ref_medians:
                ratio = stats.ratio_ci(mine, ref_medians[key], confidence, resamples, seed)
                row['reference_ratio'] = ratio.as_dict()
                limit = 1.0 + thresholds.reference_tolerance
                # Slower beyond the tolerance with confidence: the whole CI is over the limit
                # (a single-session run, without a CI, is judged on its point estimate).
                low = ratio.lo if ratio.has_ci else ratio.value
                if low > limit:
                    reasons.append(f'{stats.format_ratio(ratio)} the reference step time '
                                   f'(limit {limit:.2f}×)')
            else:
                row['reference_ratio'] = None
        row['passed'] = not reasons
        row['reasons'] = reasons
        rows.append(row)
    for key, errs in sorted(errors.items(), key=lambda kv: analysis.sort_key(kv[0])):
        rows.append({**analysis.key_dict(key), 'passed': False,
                     'reasons': [f'error in {e}' for e in errs]})
    run_reasons = []
    if results.get('interrupted'):
        run_reasons.append('the run was interrupted')
    for fatal in results.get('fatal') or []:  # a session that crashed after its cells' samples
        run_reasons.append(f"session {fatal.get('session')} failed: {fatal.get('reason')}")
    if not cells:
        run_reasons.append('no cell was measured')
    failed = [r for r in rows if not r['passed']]
    if failed:
        run_reasons.append(f'{len(failed)} of {len(rows)} cells failed')
    return {'passed': not run_reasons, 'cells': rows, 'reasons': run_reasons,
            'reference': ref_info, 'thresholds': _thresholds_dict(thresholds)}


def _thresholds_dict(t):
    return {'min_floor_fraction': dict(t.min_floor_fraction), 'max_step_ms': t.max_step_ms,
            'allow_throttling': t.allow_throttling, 'reference': t.reference,
            'reference_tolerance': t.reference_tolerance}


def _threshold_reasons(cell, t):
    reasons = []
    minimum = t.min_floor_fraction.get(cell['mode'])
    fraction, basis = cell['floor_fraction'], 'peak'
    if fraction is None:
        fraction, basis = cell['copy_fraction'], 'copy'
    if minimum is not None and fraction is not None and fraction.value < minimum:
        reasons.append(f'achieved {fraction.value:.1%} of the floor ({basis} bandwidth), '
                       f'minimum {minimum:.1%}')
    ms = cell['ms_per_step'].value
    if t.max_step_ms is not None and ms > t.max_step_ms:
        reasons.append(f'{ms:.3f} ms/step over the maximum {t.max_step_ms:g} ms')
    if not t.allow_throttling and cell['throttle_reasons']:
        sessions = ', '.join(str(s) for s in cell['throttled_sessions'])
        reasons.append(f"throttled ({', '.join(cell['throttle_reasons'])}) in session(s) "
                       f'{sessions}')
    return reasons


def _medians(results):
    out = {}
    for s in analysis.ok_samples(results):
        out.setdefault(analysis.cell_key(s), []).append(analysis.session_median(s))
    return out
