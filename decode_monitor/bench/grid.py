"""The bench grid: YAML file -> validated Grid, CLI overrides on top.

Every error names the key it is about ("contexts[2]: expected a positive integer, got 'x'").
Where named grids are found and how a file is read is `grid_files`; the generic checkers of one
value are `grid_values`; this module is the grid's schema: its keys, defaults and cells.
"""
from dataclasses import asdict, dataclass, field, fields, replace
import os

from decode_monitor.bench.corunner import BUILTIN
from decode_monitor.bench.grid_files import locate, read_mapping
from decode_monitor.bench.grid_values import (
    choice, fail, GridError, nonempty_list, number, pos_int)

DTYPES = ('auto', 'bfloat16', 'float16', 'float32')  # auto: bfloat16 on a GPU, float32 on a CPU
DEVICES = ('auto', 'cuda', 'cpu')
ORDERS = ('random', 'alternate')
# The engine's modes and weight formats (engine.decoder.MODES, engine.fused.quant.FORMATS),
# repeated so that `bench --help` does not import torch; test_bench_grid checks they agree.
# bf16 = unquantised (the model's dtype). Which backends serve a format or a batch: their classes
# say (registered_backends).
MODES = ('eager', 'graph')
WEIGHTS = ('bf16', 'int8', 'int4')
BATCHES = (1, 2, 4, 8, 16)  # the study's batch sizes (any positive integer is accepted)
# Co-runners: none, the built-in loops, or (any other value) a command line.
CO_RUNNERS = ('none',) + BUILTIN


def pairs_with(backend, weights):
    """Whether a cell of this backend can run these weights: bf16 runs on every backend."""
    return backend in registered_backends(serving=weights)


@dataclass(frozen=True)
class Verdict:
    min_floor_fraction: dict = field(default_factory=dict)  # mode -> minimum fraction
    max_step_ms: float = None
    allow_throttling: bool = False
    reference: str = None
    reference_tolerance: float = 0.10


@dataclass(frozen=True)
class Grid:
    models: tuple
    contexts: tuple
    modes: tuple = MODES
    backends: tuple = ('hf',)
    weights: tuple = ('bf16',)
    batches: tuple = (1,)
    co_runners: tuple = ('none',)
    dtype: str = 'bfloat16'
    device: str = 'auto'
    sessions: int = 10
    steps: int = 100
    warmup: int = 20
    order: str = 'random'
    seed: int = 0
    memory_margin_gb: float = 2.0
    memory_limit_gb: float = None
    peak_bandwidth_gbs: float = None
    session_timeout_s: float = 1800.0
    profile_steps: int = 3
    profile_context: int = None
    confidence: float = 0.95
    resamples: int = 9999
    verdict: Verdict = field(default_factory=Verdict)
    kernel_configs: str = None  # fused kernels' table: a file, 'defaults', None (look it up)
    price_per_gpu_hour: float = None  # what a GPU-hour costs (any currency): the cost figure
    prompt_tokens: tuple = ()  # time to first token at these prompt lengths (bench/ttft.py)
    source: str = None  # the file it came from

    def cells(self):
        """Every (model, ctx, backend, mode, weights, batch, co_runner) of the grid, in file order.

        Quantised weights pair only with the backends that serve them: a grid of backends
        [hf, fused] and weights [bf16, int4] has hf×bf16, fused×bf16 and fused×int4 cells.
        (A batch above 1 with a batch-1 backend is refused when the grid is read.)
        """
        return [(m, c, b, mode, w, n, r) for m in self.models for c in self.contexts
                for b in self.backends for mode in self.modes for w in self.weights
                for n in self.batches for r in self.co_runners if pairs_with(b, w)]

    def as_dict(self):
        return asdict(self)


def _model(key, value):
    from decode_monitor.engine.presets import PRESETS
    if not isinstance(value, str) or not value:
        fail(key, 'a preset name or a checkpoint directory', value)
    if value in PRESETS or value in ('smollm2', 'default'):
        return value
    if os.path.isdir(value) or (os.path.isfile(value) and value.endswith('.gguf')):
        return value
    raise GridError(f'{key}: {value!r} is neither a preset ({", ".join(sorted(PRESETS))}), '
                    "'smollm2', a checkpoint directory nor a .gguf file")


def registered_backends(serving=None, batched=False):
    """Backends the engine knows (engine/decoder.py's table), as their classes describe them:
    `serving` a weight format, only those that serve it (all serve bf16, the others what their
    `formats` list); `batched`, only those that decode more than one sequence a step."""
    from decode_monitor.engine.decoder import BACKENDS
    return tuple(name for name, factory in sorted(BACKENDS.items())
                 if serving in (None, 'bf16') or serving in getattr(factory, 'formats', ())
                 if not batched or getattr(factory, 'batched', False))


def _verdict(raw, base_dir):
    if raw is None:
        return Verdict()
    if not isinstance(raw, dict):
        fail('verdict', 'a mapping', raw)
    known = {f.name for f in fields(Verdict)}
    for key in raw:
        if key not in known:
            raise GridError(f'verdict.{key}: unknown key; known: {", ".join(sorted(known))}')
    mins = raw.get('min_floor_fraction', {}) or {}
    if isinstance(mins, (int, float)) and not isinstance(mins, bool):
        mins = {mode: mins for mode in MODES}
    if not isinstance(mins, dict):
        fail('verdict.min_floor_fraction', 'a number or a mapping mode -> number', mins)
    clean = {}
    for mode, value in mins.items():
        choice('verdict.min_floor_fraction', mode, MODES)
        clean[mode] = number(f'verdict.min_floor_fraction.{mode}', value)
        if clean[mode] > 1.0:
            fail(f'verdict.min_floor_fraction.{mode}', 'a fraction <= 1', value)
    allow = raw.get('allow_throttling', False)
    if not isinstance(allow, bool):
        fail('verdict.allow_throttling', 'true or false', allow)
    reference = raw.get('reference')
    if reference is not None:
        if not isinstance(reference, str):
            fail('verdict.reference', "a path to a results.json, 'shipped' or null", reference)
        if reference != 'shipped':  # the profile shipped for this GPU model (bench.verdict)
            reference = resolve_path(reference, base_dir)
    return Verdict(
        min_floor_fraction=clean,
        max_step_ms=number('verdict.max_step_ms', raw.get('max_step_ms'), allow_none=True,
                           exclusive=True),
        allow_throttling=allow, reference=reference,
        reference_tolerance=number('verdict.reference_tolerance',
                                   raw.get('reference_tolerance', 0.10)))


def resolve_path(path, base_dir):
    """A relative path in a grid file means relative to that file (else to the cwd)."""
    if os.path.isabs(path) or base_dir is None:
        return path
    candidate = os.path.join(base_dir, path)
    return candidate if os.path.exists(candidate) else path


def from_mapping(raw, source='<grid>', base_dir=None):
    """Validate a parsed YAML mapping into a Grid."""
    if not isinstance(raw, dict):
        raise GridError(f'{source}: the grid must be a mapping of keys, not {type(raw).__name__}')
    known = {f.name for f in fields(Grid)} - {'source'}
    for key in raw:
        if key not in known:
            raise GridError(f'{source}: {key}: unknown key; known: {", ".join(sorted(known))}')
    for key in ('models', 'contexts'):
        if key not in raw:
            raise GridError(f'{source}: {key}: missing (required)')
    try:
        return _build(raw, source, base_dir)
    except GridError as exc:
        raise GridError(f'{source}: {exc}') from None


def _build(raw, source, base_dir):
    defaults = Grid(models=(), contexts=())
    get = raw.get
    models = nonempty_list('models', raw['models'])
    models = tuple(_model(f'models[{i}]', m) for i, m in enumerate(models))
    contexts = nonempty_list('contexts', raw['contexts'])
    contexts = tuple(pos_int(f'contexts[{i}]', c) for i, c in enumerate(contexts))
    modes = nonempty_list('modes', get('modes', list(MODES)))
    modes = tuple(choice(f'modes[{i}]', m, MODES) for i, m in enumerate(modes))
    known_backends = registered_backends()
    backends = nonempty_list('backends', get('backends', ['hf']))
    backends = tuple(choice(f'backends[{i}]', b, known_backends)
                     for i, b in enumerate(backends))
    weights = _weights(get('weights', ['bf16']), backends)
    batches = _batches(get('batches', [1]), backends)
    co_runners = _co_runners(get('co_runners', ['none']))
    profile_context = get('profile_context')
    if profile_context is not None:
        pos_int('profile_context', profile_context)
    return Grid(
        models=models, contexts=contexts, modes=modes, backends=backends, weights=weights,
        batches=batches, co_runners=co_runners,
        dtype=choice('dtype', get('dtype', defaults.dtype), DTYPES),
        device=choice('device', get('device', defaults.device), DEVICES),
        sessions=pos_int('sessions', get('sessions', defaults.sessions)),
        steps=pos_int('steps', get('steps', defaults.steps)),
        warmup=pos_int('warmup', get('warmup', defaults.warmup), minimum=0),
        order=choice('order', get('order', defaults.order), ORDERS),
        seed=pos_int('seed', get('seed', defaults.seed), minimum=0),
        memory_margin_gb=number('memory_margin_gb',
                                get('memory_margin_gb', defaults.memory_margin_gb)),
        memory_limit_gb=number('memory_limit_gb', get('memory_limit_gb'), allow_none=True,
                               exclusive=True),
        peak_bandwidth_gbs=number('peak_bandwidth_gbs', get('peak_bandwidth_gbs'),
                                  allow_none=True, exclusive=True),
        session_timeout_s=number('session_timeout_s',
                                 get('session_timeout_s', defaults.session_timeout_s),
                                 exclusive=True),
        profile_steps=pos_int('profile_steps', get('profile_steps', defaults.profile_steps)),
        profile_context=profile_context,
        confidence=_confidence(get('confidence', defaults.confidence)),
        resamples=pos_int('resamples', get('resamples', defaults.resamples), minimum=100),
        verdict=_verdict(get('verdict'), base_dir),
        kernel_configs=_kernel_configs(get('kernel_configs'), base_dir),
        price_per_gpu_hour=number('price_per_gpu_hour', get('price_per_gpu_hour'),
                                  allow_none=True, exclusive=True),
        prompt_tokens=_prompt_tokens(get('prompt_tokens')),
        source=source)


def _prompt_tokens(value):
    """() when absent or empty (no TTFT cells), else distinct positive lengths."""
    if value is None or value == [] or value == ():
        return ()
    values = nonempty_list('prompt_tokens', value)
    return tuple(pos_int(f'prompt_tokens[{i}]', p) for i, p in enumerate(values))


def _kernel_configs(value, base_dir):
    """None, 'defaults', or a readable table (made absolute: sessions may run elsewhere)."""
    if value in (None, 'defaults'):
        return value
    if not isinstance(value, str):
        fail('kernel_configs', "a table file, 'defaults' or null", value)
    if base_dir and not os.path.isabs(value) and os.path.exists(os.path.join(base_dir, value)):
        value = os.path.join(base_dir, value)
    from decode_monitor.engine.fused.tables import TableError, load
    try:
        load(value)
    except TableError as exc:
        raise GridError(f'kernel_configs: {exc}') from None
    return os.path.abspath(value)


def _weights(raw, backends):
    weights = nonempty_list('weights', raw)
    weights = tuple(choice(f'weights[{i}]', w, WEIGHTS) for i, w in enumerate(weights))
    for i, w in enumerate(weights):
        able = registered_backends(serving=w)
        if not any(b in able for b in backends):
            # Without a backend that serves it the format would silently have no cells.
            raise GridError(f'weights[{i}]: {w} needs backend {" or ".join(able)} in '
                            f'backends, which lists only {", ".join(backends)}')
    return weights


def _batches(raw, backends):
    batches = nonempty_list('batches', raw)
    batches = tuple(pos_int(f'batches[{i}]', b) for i, b in enumerate(batches))
    able = registered_backends(batched=True)
    single = [b for b in backends if b not in able]
    for i, b in enumerate(batches):
        if b > 1 and single:
            # A batch-1 backend cannot run it; leaving its cells out would hide that silently.
            raise GridError(f'batches[{i}]: batch {b} needs a batched backend '
                            f'({", ".join(able)}); {", ".join(single)} '
                            f'{"decodes" if len(single) == 1 else "decode"} batch 1 only '
                            '(time it in a grid of its own with batches [1])')
    return batches


def _co_runners(raw):
    """none, a built-in co-runner, or a command line (split as a shell would, run without one)."""
    import shlex
    runners = nonempty_list('co_runners', raw)
    for i, r in enumerate(runners):
        if not isinstance(r, str) or not r.strip():
            fail(f'co_runners[{i}]', f'{", ".join(CO_RUNNERS)} or a command line', r)
        if r not in CO_RUNNERS:
            try:
                words = shlex.split(r)
            except ValueError as exc:
                raise GridError(f'co_runners[{i}]: {r!r} is not a command line: {exc}') from None
            if not words:
                fail(f'co_runners[{i}]', f'{", ".join(CO_RUNNERS)} or a command line', r)
    return tuple(runners)


def _confidence(value):
    value = number('confidence', value, exclusive=True)
    if value >= 1.0:
        fail('confidence', 'a number in (0, 1)', value)
    return value


def load(name_or_path):
    """A named grid ('study', 'quick') or a grid file, validated into a Grid."""
    path = locate(name_or_path)
    return from_mapping(read_mapping(path), source=path,
                        base_dir=os.path.dirname(os.path.abspath(path)))


# CLI flag -> grid key; values are validated exactly like the file's.
OVERRIDES = ('models', 'contexts', 'modes', 'backends', 'weights', 'batches', 'co_runners',
             'sessions', 'steps', 'warmup', 'device', 'dtype', 'order', 'seed',
             'memory_limit_gb', 'peak_bandwidth_gbs', 'kernel_configs', 'price_per_gpu_hour',
             'prompt_tokens')


def with_overrides(grid, **values):
    """A new Grid with the given keys replaced (None means: keep the file's value)."""
    changes = {k: v for k, v in values.items() if v is not None}
    for key in changes:
        if key not in OVERRIDES and key not in ('reference', 'profile_context'):
            raise GridError(f'{key}: cannot be overridden from the command line')
    if not changes:
        return grid
    raw = grid.as_dict()
    raw.pop('source')
    verdict = raw.pop('verdict')
    if 'reference' in changes:
        verdict['reference'] = changes.pop('reference')
    for key, value in changes.items():
        raw[key] = list(value) if isinstance(value, tuple) else value
    for key in ('models', 'contexts', 'modes', 'backends', 'weights', 'batches', 'co_runners'):
        raw[key] = list(raw[key])
    raw['verdict'] = verdict
    try:
        updated = _build(raw, grid.source, None)
    except GridError as exc:
        raise GridError(f'command line: {exc}') from None
    return replace(updated, source=grid.source)
