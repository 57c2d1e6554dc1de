"""What the diagnostics say, as plain data: (name, level, message, hardware_id, [(key, value)]).

The node wraps these into diagnostic_msgs; the engine's GPU scripts print the very same values
on machines without ROS.
"""
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


def statuses(snapshot, stats, info, gpu, gpu_sample, thresholds, prefix=PREFIX):
    """snapshot: DecodeService.snapshot(); stats: WindowStats or None; info: dict describing the
    decoder (model, dtype, mode, ...); gpu: GpuTelemetry; gpu_sample: GpuSample; prefix: the
    node's name, as diagnostic_updater names a node's statuses."""
    hardware_id = gpu.uuid if gpu.available else 'cpu'
    level, message = decode_health(stats, thresholds, info.get('fallback_reason'),
                                   snapshot['load_error'], snapshot.get('worker_error'))
    if snapshot['state'] == 'loading' and not snapshot.get('worker_error'):
        level, message = OK, 'loading model'
    elif snapshot['state'] in ('unconfigured', 'inactive') and level == OK:
        message = f'{snapshot["state"]} (lifecycle): not serving'
    s = stats
    decode = ('decode', level, message, [
        ('state', snapshot['state']),
        ('model', info.get('model')),
        ('dtype', info.get('dtype')),
        ('backend', info.get('backend')),
        ('weights', info.get('weights')),
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
    ])
    g = gpu_sample
    glevel, gmessage = gpu_health(gpu, g)
    gpu_status = ('gpu', glevel, gmessage, [
        ('name', gpu.name), ('uuid', gpu.uuid), ('driver', gpu.driver),
        ('sm clock (MHz)', g.sm_clock_mhz), ('memory clock (MHz)', g.mem_clock_mhz),
        ('temperature (C)', g.temperature_c), ('power (W)', g.power_w),
        ('throttle reasons', ', '.join(g.throttle_reasons) if gpu.available else None),
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
                    ('publish failures', c.publish_failures),
                ])
    return [(f'{prefix}: {name}', level, message, hardware_id,
             [(key, fmt(value)) for key, value in values])
            for name, level, message, values in (decode, gpu_status, requests)]
