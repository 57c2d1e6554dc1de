"""The node's parameters: declared with descriptions and ranges, validated as a whole.

What the loaded decoder depends on (model, device, backend, weights, max_context, ...) is
read-only: change it and reload through the lifecycle (cleanup, configure). Thresholds and
limits (RUNTIME) can be changed with `ros2 param set`; a change is checked against every other
value before it is taken, and refused with the reason. Doubles accept integers (`50` for
`50.0`), as a user types them.
"""
from dataclasses import dataclass

from rcl_interfaces.msg import (
    FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult)
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException

from decode_monitor.engine.decoder import BACKENDS, MODES
from decode_monitor.engine.factory import DecoderSettings, DTYPES
from decode_monitor.engine.fused.quant import FORMATS
from decode_monitor.serving.protocol import Limits
from decode_monitor.telemetry.health import Thresholds


class ParameterError(ValueError):
    """A parameter value the node cannot start with (or take at runtime)."""


@dataclass(frozen=True)
class NodeConfig:
    settings: DecoderSettings
    limits: Limits
    thresholds: Thresholds
    queue_size: int
    request_timeout_s: float
    diagnostics_period: float
    bandwidth_override_gbps: float
    mirror_diagnostics: bool
    window_steps: int
    gpu_index: int
    autostart: bool
    system_prompt: str = ''


def _int(low, high):
    return dict(integer_range=[IntegerRange(from_value=low, to_value=high, step=1)])


def _float(low, high):
    return dict(floating_point_range=[FloatingPointRange(from_value=low, to_value=high)])


# name: (default, description, range)
PARAMETERS = {
    'model': ('smollm2', 'smollm2 (embedded default), a preset (qwen2.5-7b, llama-3-8b, '
              'mistral-7b, tiny), a local checkpoint directory or a .gguf file', {}),
    'device': ('auto', 'auto, cpu, cuda or cuda:N', {}),
    'dtype': ('auto', 'auto (bfloat16 on CUDA, float32 on CPU), ' + ', '.join(DTYPES), {}),
    'mode': ('auto', 'auto (graph on CUDA, eager on a CPU), graph (one CUDA graph per step; '
             'falls back to eager with a WARN when it cannot be captured) or eager', {}),
    'backend': ('auto', 'auto, hf (transformers forward), fused or persistent', {}),
    'weights': ('bf16', 'bf16 (as loaded), int8 or int4: weight-only quantisation at load '
                'time, backends fused and persistent', {}),
    'max_context': (2048, 'static KV cache length in tokens (prompt + new tokens)',
                    _int(16, 1 << 20)),
    'default_max_new_tokens': (128, 'new tokens when a request does not say', _int(1, 1 << 20)),
    'max_new_tokens_cap': (1024, 'largest max_new_tokens a request may ask for',
                           _int(1, 1 << 20)),
    'max_request_bytes': (1 << 20, 'largest request message accepted', _int(64, 1 << 30)),
    'queue_size': (16, 'requests waiting beyond the one decoding; more are rejected',
                   _int(1, 100000)),
    'request_timeout_s': (0.0, 'end a request with an error after this long (0: never)',
                          _float(0.0, 86400.0)),
    'latency_budget_ms': (0.0, 'WARN when step p95 exceeds this, ERROR at twice (0: off)',
                          _float(0.0, 1e6)),
    'min_floor_fraction': (0.0, 'WARN when the achieved fraction of the memory floor is below '
                           'this (0: off)', _float(0.0, 1.0)),
    'diagnostics_period': (1.0, 'seconds between DiagnosticArray messages', _float(0.05, 60.0)),
    'bandwidth_override_gbps': (0.0, 'peak memory bandwidth in GB/s for the floor (0: from '
                                'NVML)', _float(0.0, 1e5)),
    'mirror_diagnostics': (False, 'also publish on /diagnostics for diagnostic_aggregator', {}),
    'window_steps': (512, 'decode steps in the latency window', _int(8, 1000000)),
    'gpu_index': (0, 'NVML index of the GPU to report', _int(0, 64)),
    'kernel_configs': ('', 'fused kernels\' launch table: empty for the one tuned for this GPU '
                       '(bench tune\'s cache, else the shipped one, else defaults), '
                       '"defaults", or a table file', {}),
    'system_prompt': ('', 'standing instructions: the system message of every chat request '
                      'without its own; prefilled once at start-up and kept in the KV cache '
                      '(empty: none)', {}),
    'autostart': (True, 'configure and activate at start-up (false: wait for a lifecycle '
                  'manager)', {}),
}
RUNTIME = ('latency_budget_ms', 'min_floor_fraction', 'request_timeout_s',
           'default_max_new_tokens', 'max_new_tokens_cap', 'diagnostics_period')


def declare_and_read(node):
    """Declare every parameter and return a validated NodeConfig, or raise ParameterError."""
    values = {}
    for name, (default, description, limits) in PARAMETERS.items():
        descriptor = ParameterDescriptor(
            description=description, read_only=name not in RUNTIME,
            dynamic_typing=isinstance(default, float), **limits)
        try:
            values[name] = node.declare_parameter(name, default, descriptor).value
        except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
            raise ParameterError(f'parameter {name}: {exc} ({description})') from None
    return validate(values)


def current_values(node):
    return {name: node.get_parameter(name).value for name in PARAMETERS}


def check_update(node, parameters):
    """(SetParametersResult, NodeConfig or None): a runtime change checked as a whole."""
    values = current_values(node)
    for parameter in parameters:
        if parameter.name not in RUNTIME:
            return _refused(f'{parameter.name} is read-only while the node runs: change it '
                            'in the parameters file and reload (lifecycle cleanup, '
                            'configure)'), None
        values[parameter.name] = parameter.value
    try:
        config = validate(values)
    except ParameterError as exc:
        return _refused(str(exc)), None
    return SetParametersResult(successful=True), config


def _refused(reason):
    return SetParametersResult(successful=False, reason=reason)


def validate(values):
    values = dict(values)
    for name, (default, _, limits) in PARAMETERS.items():
        values[name] = _typed(name, values[name], default)
        bounds = limits.get('integer_range') or limits.get('floating_point_range')
        if bounds and not bounds[0].from_value <= values[name] <= bounds[0].to_value:
            raise ParameterError(f'parameter {name}={values[name]} must be between '
                                 f'{bounds[0].from_value} and {bounds[0].to_value}')

    def choice(name, allowed):
        if values[name] not in allowed:
            raise ParameterError(f'parameter {name}={values[name]!r} must be one of '
                                 f'{", ".join(allowed)}')
    choice('mode', ('auto',) + MODES)
    choice('dtype', ('auto',) + tuple(DTYPES))
    choice('backend', ('auto',) + tuple(BACKENDS))
    choice('weights', FORMATS)
    backend, weights = values['backend'], values['weights']
    if weights != 'bf16' and backend != 'auto' and \
            weights not in getattr(BACKENDS[backend], 'formats', ()):
        able = ' or '.join(n for n, f in BACKENDS.items() if weights in getattr(f, 'formats', ()))
        raise ParameterError(f'parameter weights={weights!r} needs backend {able} (or auto); '
                             f'{backend} serves the weights as loaded')
    device = values['device']
    if device not in ('auto', 'cpu', 'cuda') and not (
            device.startswith('cuda:') and device[5:].isdigit()):
        raise ParameterError(f'parameter device={device!r} must be auto, cpu, cuda or cuda:N')
    if not values['model'].strip():
        raise ParameterError('parameter model must not be empty')
    if values['default_max_new_tokens'] > values['max_new_tokens_cap']:
        raise ParameterError('default_max_new_tokens must not exceed max_new_tokens_cap')
    if values['max_new_tokens_cap'] >= values['max_context']:
        raise ParameterError('max_new_tokens_cap must be below max_context (room for a prompt)')
    tables = values['kernel_configs'] or None
    if tables not in (None, 'defaults'):
        from decode_monitor.engine.fused.tables import load, TableError
        try:
            load(tables)  # a bad table stops the start, before minutes of model loading
        except (TableError, OSError) as exc:
            raise ParameterError(f'parameter kernel_configs: {exc}') from None
    return NodeConfig(
        settings=DecoderSettings(values['model'], device, values['dtype'], values['mode'],
                                 values['backend'], values['max_context'], values['weights'],
                                 tables),
        limits=Limits(default_max_new_tokens=values['default_max_new_tokens'],
                      max_new_tokens=values['max_new_tokens_cap'],
                      max_request_bytes=values['max_request_bytes']),
        thresholds=Thresholds(values['latency_budget_ms'], values['min_floor_fraction']),
        queue_size=values['queue_size'], request_timeout_s=values['request_timeout_s'],
        diagnostics_period=values['diagnostics_period'],
        bandwidth_override_gbps=values['bandwidth_override_gbps'],
        mirror_diagnostics=values['mirror_diagnostics'], window_steps=values['window_steps'],
        gpu_index=values['gpu_index'], autostart=values['autostart'],
        system_prompt=values['system_prompt'])


def _typed(name, value, default):
    """The value in its parameter's type: an integer is a valid double, nothing else mixes."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ParameterError(f'parameter {name}={value!r} must be a '
                             f'{type(default).__name__.replace("str", "string")}')
    return value
