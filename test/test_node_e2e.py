"""The node as users run it: its console script in its own process, real rclpy topics."""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

rclpy = pytest.importorskip('rclpy')
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from std_msgs.msg import Float32, String  # noqa: E402

from decode_monitor.node.ask import AskClient, wait_for  # noqa: E402

EXECUTABLE = os.path.join(os.path.dirname(sys.executable), 'llm_decoder')


@pytest.fixture(scope='module')
def graph():
    """The node process plus a client node in this process, both on /decode."""
    node = subprocess.Popen([
        EXECUTABLE, '--ros-args', '-r', '__ns:=/decode', '-p', 'model:=smollm2',
        '-p', 'max_context:=256', '-p', 'max_new_tokens_cap:=48', '-p', 'queue_size:=3',
        '-p', 'default_max_new_tokens:=12'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rclpy.init()
    client = AskClient('/decode')
    client.chunks, client.arrays, client.latencies = [], [], []
    client._on_text = lambda i, t: client.chunks.append((i, t))
    client.create_subscription(DiagnosticArray, '/decode/diagnostics',
                               lambda a: client.arrays.append((time.monotonic(), a)), 10)
    client.create_subscription(Float32, '/decode/step_latency',
                               lambda m: client.latencies.append(m.data), 100)
    client.cancel_pub = client.create_publisher(String, '/decode/cancel', 10)
    assert wait_for(client, client.node_ready, 60), 'node did not subscribe to /decode/request'
    ready = wait_for(client, lambda: client.arrays and _values(
        client.arrays[-1][1], 'decode').get('state') == 'ready', 180)
    assert ready, 'model did not load'
    yield client
    client.destroy_node()
    rclpy.shutdown()
    node.send_signal(signal.SIGINT)
    out, _ = node.communicate(timeout=20)
    assert node.returncode == 0, out


def _values(array, name):
    for status in array.status:
        if status.name == f'llm_decoder: {name}':
            return {kv.key: kv.value for kv in status.values}
    return {}


def _responses_for(client, ids, timeout=120):
    assert wait_for(client, lambda: all(i in client.responses for i in ids), timeout)
    return [client.responses[i] for i in ids]


def test_requests_stream_tokens_and_end_in_one_response(graph):
    ids = [graph.send(p) for p in ('What is 2 + 2?', 'Name a color.', 'Say hello.')]
    bodies = _responses_for(graph, ids)
    for request_id, body in zip(ids, bodies):
        assert body['status'] == 'done', body
        assert body['tokens'] > 0 and body['ttft_ms'] > 0 and body['step_ms_p50'] > 0
        streamed = ''.join(t for i, t in graph.chunks if i == request_id)
        assert streamed == body['text']
    assert len(graph.latencies) > 0 and all(v > 0 for v in graph.latencies)


def test_bad_input_is_answered_and_the_node_keeps_serving(graph):
    pub = graph._request_pub
    cases = {
        'malformed': '{"id": "malformed", "prompt": ',
        'empty': '{"id": "empty", "prompt": ""}',
        'types': '{"id": "types", "prompt": "x", "temperature": "hot"}',
        'cap': '{"id": "cap", "prompt": "x", "max_new_tokens": 49}',
        'long': json.dumps({'id': 'long', 'prompt': 'word ' * 400, 'chat': False}),
    }
    for raw in cases.values():
        pub.publish(String(data=raw))
    graph.cancel_pub.publish(String(data='no-such-id'))
    bodies = dict(zip(cases, _responses_for(graph, list(cases))))
    assert 'malformed JSON' in bodies['malformed']['error']
    assert 'empty prompt' in bodies['empty']['error']
    assert '"temperature" must be a number' in bodies['types']['error']
    assert 'between 1 and 48' in bodies['cap']['error']
    assert 'exceeds max_context 256' in bodies['long']['error']
    assert all(b['status'] == 'error' for b in bodies.values())
    assert 'no queued or running' in _responses_for(graph, ['no-such-id'])[0]['error']
    flood = [graph.send('Count to ten.', id=f'flood-{i}', max_new_tokens=8) for i in range(8)]
    flood_bodies = _responses_for(graph, flood, timeout=180)
    statuses = [b['status'] for b in flood_bodies]
    assert 'done' in statuses
    assert any('queue full' in (b['error'] or '') for b in flood_bodies)
    last = _responses_for(graph, [graph.send('Are you still there?')])[0]
    assert last['status'] == 'done'


def test_diagnostics_arrive_about_once_a_second_with_numbers(graph):
    start = len(graph.arrays)
    assert wait_for(graph, lambda: len(graph.arrays) >= start + 4, 10)
    stamps = [t for t, _ in graph.arrays[start:]]
    period = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    assert 0.7 < period < 1.4
    array = graph.arrays[-1][1]
    assert [s.name for s in array.status] == [
        'llm_decoder: decode', 'llm_decoder: gpu', 'llm_decoder: requests']
    assert all(s.hardware_id == 'cpu' for s in array.status)
    decode = _values(array, 'decode')
    for key in ('step p50 (ms)', 'step p95 (ms)', 'step p99 (ms)', 'tokens/s', 'floor (ms)',
                'achieved fraction of floor (measured bw)', 'bytes/step'):
        assert float(decode[key]) > 0, key
    assert decode['mode'] == 'eager' and decode['graph fallbacks'] == '1'
    requests = _values(array, 'requests')
    assert int(requests['served']) >= 4 and int(requests['rejected']) >= 5
    assert _values(array, 'gpu')['temperature (C)'] == 'unavailable'
