"""Kernel-config tables as data: JSON files with provenance, found in a fixed order.

`resolve(spec, device)` returns the `KernelConfigs` a backend uses:
1. spec: a table file (an explicit `kernel_configs` parameter or `--kernel-configs`), or
   'defaults' for none;
2. the user's cache, for this GPU and Triton version (what `bench tune` writes):
   `$DECODE_MONITOR_CACHE`, else `$XDG_CACHE_HOME/decode_monitor`, else
   `~/.cache/decode_monitor`, then `kernel_configs/<gpu>-triton-<version>.json`;
3. the table shipped for this GPU model (package data `tuned/<gpu>.json`);
4. the defaults.
The environment is read when a backend is built, never at import. A table that cannot be read
is an error naming the file, not a silent fallback: a user who tuned expects the tuning used.
"""
import datetime
import json
import os
import re

from decode_monitor.engine.fused.configs import (
    DEFAULTS, FORMATS, KINDS, UNTUNED, AttentionConfig, AttentionKey, GemvConfig, GemvKey,
    KernelConfigs)

FORMAT = 'decode_monitor.kernel_configs/1'
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tuned')
FORCED_DEFAULTS = 'defaults (kernel_configs=defaults)'


class TableError(ValueError):
    """A kernel-config table that is missing or malformed."""


def slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': a GPU name as a file name."""
    return re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-') or 'unknown'


def device_name(device):
    import torch
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'


def triton_version():
    try:
        import triton
    except ImportError:
        return 'none'
    return triton.__version__


def cache_dir(environ=None):
    env = os.environ if environ is None else environ
    if env.get('DECODE_MONITOR_CACHE'):
        return env['DECODE_MONITOR_CACHE']
    base = env.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'decode_monitor')


def user_table_path(gpu_name, triton=None, environ=None):
    return os.path.join(cache_dir(environ), 'kernel_configs',
                        f'{slug(gpu_name)}-triton-{triton or triton_version()}.json')


def shipped_table_path(gpu_name):
    return os.path.join(SHIPPED_DIR, f'{slug(gpu_name)}.json')


def resolve(spec, device, environ=None):
    """The KernelConfigs for a backend on `device` (see the module docstring for the order)."""
    if isinstance(spec, KernelConfigs):
        return spec
    return resolve_for(spec, device_name(device), environ)


def resolve_for(spec, gpu_name, environ=None):
    """resolve() for a GPU model by name ('cpu' without one)."""
    if spec == 'defaults':
        return KernelConfigs(source=FORCED_DEFAULTS)
    if spec:
        return load(spec)
    for path in (user_table_path(gpu_name, environ=environ), shipped_table_path(gpu_name)):
        if os.path.isfile(path):
            return load(path)
    return DEFAULTS


# -- the file ---------------------------------------------------------------------------------
def load(path):
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TableError(f'kernel configs {path!r}: no such file') from None
    except (OSError, ValueError) as exc:
        raise TableError(f'kernel configs {path!r}: not readable JSON ({exc})') from None
    try:
        return from_dict(data, source=os.path.abspath(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise TableError(f'kernel configs {path!r}: {exc}') from None


def from_dict(data, source):
    if not isinstance(data, dict) or data.get('format') != FORMAT:
        raise ValueError(f'format is not {FORMAT!r}')
    gemv, attention = {}, {}
    for i, row in enumerate(data.get('gemv', [])):
        key = GemvKey(row['kind'], row['weights'], int(row['n']), int(row['k']))
        if key.kind not in KINDS or key.weights not in FORMATS:
            raise ValueError(f'gemv[{i}]: kind {key.kind!r} / weights {key.weights!r} unknown')
        gemv[key] = _checked(GemvConfig(*row['config']), f'gemv[{i}]')
    for i, row in enumerate(data.get('attention', [])):
        key = AttentionKey(int(row['kv_heads']), int(row['group']), int(row['max_context']))
        attention[key] = _checked(AttentionConfig(*row['config']), f'attention[{i}]')
    return KernelConfigs(gemv, attention, source, dict(data.get('provenance') or {}))


def _checked(config, where):
    for name, value in config._asdict().items():
        if value is None and name in ('n_splits', 'max_registers'):
            continue
        if name == 'staged':
            if not isinstance(value, bool):
                raise ValueError(f'{where}: staged must be true or false, not {value!r}')
            continue
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{where}: {name} must be a positive integer, not {value!r}')
    for name in ('block_n', 'block_k', 'block_t', 'num_warps'):
        value = getattr(config, name, 1)
        if value & (value - 1):
            raise ValueError(f'{where}: {name} must be a power of two, not {value}')
    return config


MEASURED = ('default_ms', 'tuned_ms', 'candidates', 'model')  # kept beside a tuned row


def measurements(path):
    """{key: what bench tune measured} of a table's rows."""
    with open(path, encoding='utf-8') as f:
        data = json.load(f)
    out = {}
    for row in data.get('gemv', []):
        out[GemvKey(row['kind'], row['weights'], row['n'], row['k'])] = {
            k: row[k] for k in MEASURED if k in row}
    for row in data.get('attention', []):
        out[AttentionKey(row['kv_heads'], row['group'], row['max_context'])] = {
            k: row[k] for k in MEASURED if k in row}
    return out


def to_dict(configs, provenance=None, measured=None):
    """JSON-ready table; measured: key -> {'default_ms', 'tuned_ms', ...} kept beside a row."""
    measured = measured or {}

    def extra(key):
        return measured.get(key, {})
    return {'format': FORMAT, 'provenance': provenance or configs.provenance,
            'gemv': [{**key._asdict(), 'config': _listed(cfg), **extra(key)}
                     for key, cfg in configs.gemv_rows.items()],
            'attention': [{**key._asdict(), 'config': list(cfg), **extra(key)}
                          for key, cfg in configs.attention_rows.items()]}


def _listed(config):
    """A GEMV config as a list, without the trailing fields it leaves at their defaults (no
    register cap, not staged)."""
    row = list(config)
    if not row[-1]:
        row = row[:-1]
        if row[-1] is None:
            row = row[:-1]
    return row


def save(path, data):
    """Write atomically: an interrupted write leaves the previous table, never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=1)
        f.write('\n')
    os.replace(tmp, path)


def provenance(device, command):
    """Where a table is measured: GPU, driver and software, date, the command."""
    import torch
    import decode_monitor
    device = torch.device(device)
    out = {'gpu_name': device_name(device), 'gpu_uuid': None, 'sm_count': None,
           'compute_capability': None, 'driver': None, 'torch': torch.__version__,
           'triton': triton_version(), 'package_version': decode_monitor.__version__,
           'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
           'command': command}
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        out.update(sm_count=props.multi_processor_count,
                   compute_capability=f'{props.major}.{props.minor}',
                   gpu_uuid=f'GPU-{props.uuid}' if getattr(props, 'uuid', None) else None)
        from decode_monitor.telemetry.gpu import GpuTelemetry
        gpu = GpuTelemetry(device.index or 0)
        out.update(driver=gpu.driver, gpu_uuid=gpu.uuid or out['gpu_uuid'])
    return out


__all__ = ['FORMAT', 'TableError', 'UNTUNED', 'cache_dir', 'load', 'provenance', 'resolve',
           'resolve_for', 'save', 'shipped_table_path', 'to_dict', 'user_table_path']
