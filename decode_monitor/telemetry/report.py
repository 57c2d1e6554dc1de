"""What the diagnostics say, as plain data: (name, level, message, hardware_id, [(key, value)]).

The node wraps these into diagnostic_msgs; the engine's GPU scripts print the very same values
on machines without ROS.
"""
from decode_monitor.telemetry.device import hardware_id as _hardware_id
from decode_monitor.telemetry.health import decode_health, gpu_health, OK, WARN

PREFIX = 'llm_decoder'  # the node's default name; statuses are named '<node name>: <part>'


def fmt(value, spec='.3f'):
    if value is None:
        return 'unavailable'
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _gbps(value):
    return None if value is None else value / 1e9


def _process_line(p):
    """'python3, 2048 MiB, SM 87%' with 'unavailable' for what the driver does not say."""
    mib = None if p.used_memory_bytes is None else f'{p.used_memory_bytes / 2**20:.0f} MiB'
    sm = None if p.sm_percent is None else f'SM {p.sm_percent:.0f}%'
    return ', '.join(fmt(v) for v in (p.name, mib or 'memory unavailable',
                                      sm or 'SM share unavailable'))


def statuses(snapshot, stats, info, gpu, gpu_sample, thresholds, prefix=PREFIX, device=None,
             live=None):
    """snapshot: DecodeService.snapshot(); stats: WindowStats or None; info: dict describing the
    decoder (model, dtype, mode, ...); gpu: GpuTelemetry or JetsonTelemetry; gpu_sample:
    GpuSample; prefix: the node's name, as diagnostic_updater names a node's statuses; device:
    DeviceIdentity of the decoding device (None: not known yet); live: LiveReading of this
    tick (other processes, J/token, sharing), None without one."""
    hardware_id = _hardware_id(gpu, device)
    level, message = decode_health(stats, thresholds, info.get('fallback_reason'),
                                   snapshot['load_error'], snapshot.get('worker_error'))
    if snapshot['state'] == 'loading' and not snapshot.get('worker_error'):
        level, message = OK, 'loading model'
    elif snapshot['state'] in ('unconfigured', 'inactive') and level == OK:
        message = f'{snapshot["state"]} (lifecycle): not serving'
    sharing = live.sharing if live is not None else None
    if sharing is not None and sharing.warn and snapshot['state'] == 'ready':
        message = sharing.message if level == OK else f'{message}; {sharing.message}'
        level = max(level, WARN)
    s = stats
    decode = ('decode', level, message, [
        ('state', snapshot['state']),
        ('model', info.get('model')),
        ('dtype', info.get('dtype')),
        ('backend', info.get('backend')),
        ('weights', info.get('weights')),
        ('kernel configs', info.get('kernel_configs') or (
            'not used (backend hf)' if info.get('backend') == 'hf' else None)),
        ('mode requested', info.get('mode_requested')),
        ('mode', info.get('mode')),
        ('graph fallbacks', info.get('graph_fallbacks')),
        ('graph fallback reason', info.get('fallback_reason') or 'none'),
        ('window steps', s and s.steps),
        ('step p50 (ms)', s and s.p50_ms),
        ('step p95 (ms)', s and s.p95_ms),
        ('step p99 (ms)', s and s.p99_ms),
        ('step max (ms)', s and s.max_ms),
        ('tokens/s', s and s.tokens_per_s),
        ('context length (tokens)', s and s.context),
        ('bytes/step', s and int(s.bytes_per_step)),
        ('floor (ms)', s and s.floor_ms),
        ('achieved fraction of floor (peak bw)', s and s.fraction_of_peak),
        ('achieved fraction of floor (measured bw)', s and s.fraction_of_measured),
        ('peak bandwidth (GB/s)', _gbps(info.get('peak_bandwidth'))),
        ('peak bandwidth source', info.get('peak_source')),
        ('measured copy bandwidth (GB/s)', _gbps(info.get('measured_bandwidth'))),
        ('energy per token (J)', live and live.joules_per_token),
        ('other processes on the GPU', sharing and sharing.others),
        ('step vs alone (x)', sharing and sharing.slowdown),
    ])
    g = gpu_sample
    glevel, gmessage = gpu_health(gpu, g)
    others = live.processes if live is not None else []
    if others and gmessage == 'ok':
        gmessage = f'shared with {len(others)} other process{"es" if len(others) > 1 else ""}'
    gpu_status = ('gpu', glevel, gmessage, [
        ('name', gpu.name), ('uuid', gpu.uuid), ('driver', gpu.driver),
        ('sm clock (MHz)', g.sm_clock_mhz), ('memory clock (MHz)', g.mem_clock_mhz),
        ('temperature (C)', g.temperature_c), ('power (W)', g.power_w),
        ('load (%)', g.gpu_load_percent),
        ('throttle reasons', ', '.join(g.throttle_reasons) if gpu.available else None),
        *[(f'temperature {name} (C)', t) for name, t in sorted(g.temperatures_c.items())],
        *[(f'power {name} (W)', w) for name, w in sorted(g.rails_w.items())],
        ('other processes', len(others) if live is not None else None),
        *[(f'process {p.pid}', _process_line(p)) for p in others],
    ])
    c = snapshot['counters']
    full = snapshot['queue_depth'] >= info.get('queue_size', float('inf'))
    requests = ('requests', WARN if full else OK,
                'queue full' if full else ('busy' if snapshot['active'] else 'idle'), [
                    ('queue depth', snapshot['queue_depth']),
                    ('queue size', info.get('queue_size')),
                    ('received', c.received), ('served', c.served), ('rejected', c.rejected),
                    ('cancelled', c.cancelled), ('errors', c.errors),
                    ('time to first token p50 (ms)', snapshot['ttft_p50_ms']),
                    ('time to first token p95 (ms)', snapshot.get('ttft_p95_ms')),
                    ('prompt cache hit rate', snapshot.get('prompt_cache_hit_rate')),
                    ('publish failures', c.publish_failures),
                ])
    return [(f'{prefix}: {name}', level, message, hardware_id,
             [(key, fmt(value)) for key, value in values])
            for name, level, message, values in (decode, gpu_status, requests)]
