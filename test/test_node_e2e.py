"""The node as users run it: its console script in its own process, real rclpy topics.

Each test sends its own traffic and asserts on its own ids and on counter deltas, so the tests
pass alone and in any order.
"""
import json
import signal

import pytest

rclpy = pytest.importorskip('rclpy')
from builtin_interfaces.msg import Time  # noqa: E402
from std_msgs.msg import Float32, String  # noqa: E402

from decode_monitor.node.ask import wait_for  # noqa: E402
from ros_helpers import Client, start_node, stop_node  # noqa: E402

NS = '/decode'


@pytest.fixture(scope='module')
def graph():
    """The node process plus a client node in this process, both on /decode."""
    node = start_node(NS, 'model:=smollm2', 'max_context:=256', 'max_new_tokens_cap:=48',
                      'queue_size:=3', 'default_max_new_tokens:=12')
    rclpy.init()
    client = Client(NS)
    client.latencies = []
    client.create_subscription(Float32, f'{NS}/step_latency',
                               lambda m: client.latencies.append(m.data), 100)
    client.wait_ready()
    yield client
    client.destroy_node()
    rclpy.try_shutdown()
    out = stop_node(node, signal.SIGINT)
    assert node.returncode == 0, out


def _seconds(stamp: Time):
    return stamp.sec + stamp.nanosec * 1e-9


def _counters(client):
    count = len(client.arrays)
    assert wait_for(client, lambda: len(client.arrays) > count, 5), 'no diagnostics'
    return {k: int(v) for k, v in client.values('requests').items()
            if k in ('served', 'rejected', 'cancelled', 'errors', 'received')}


def _stream_complete(client, request_id, text, timeout=10):
    """Stream and response travel on two topics: wait until the stream caught up."""
    return wait_for(client, lambda: client.streamed(request_id) == text, timeout)


def test_requests_stream_tokens_and_end_in_one_response(graph):
    before = len(graph.latencies)
    ids = [graph.send(p) for p in ('What is 2 + 2?', 'Name a color.', 'Say hello.')]
    bodies = graph.responses_for(ids)
    for request_id, body in zip(ids, bodies):
        assert body['status'] == 'done', body
        assert body['tokens'] > 0 and body['ttft_ms'] > 0 and body['step_ms_p50'] > 0
        assert _stream_complete(graph, request_id, body['text']), (
            graph.streamed(request_id), body['text'])
    assert len(graph.latencies) > before and all(v > 0 for v in graph.latencies[before:])


def test_bad_input_is_answered_and_the_node_keeps_serving(graph):
    before = _counters(graph)
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
    bodies = dict(zip(cases, graph.responses_for(list(cases))))
    assert 'malformed JSON' in bodies['malformed']['error']
    assert 'empty prompt' in bodies['empty']['error']
    assert '"temperature" must be a number' in bodies['types']['error']
    assert 'between 1 and 48' in bodies['cap']['error']
    assert 'exceeds max_context 256' in bodies['long']['error']
    assert all(b['status'] == 'error' for b in bodies.values())
    assert 'no queued or running' in graph.responses_for(['no-such-id'])[0]['error']
    flood = [graph.send('Count to ten.', id=f'flood-{i}', max_new_tokens=8) for i in range(8)]
    flood_bodies = graph.responses_for(flood, timeout=180)
    statuses = [b['status'] for b in flood_bodies]
    assert 'done' in statuses
    assert any('queue full' in (b['error'] or '') for b in flood_bodies)
    last = graph.responses_for([graph.send('Are you still there?')])[0]
    assert last['status'] == 'done'
    after = _counters(graph)
    served = statuses.count('done') + 1
    assert after['served'] - before['served'] == served
    # four refused as they arrive, the queue-full ones too; 'long' fails on the worker
    assert after['rejected'] - before['rejected'] == 4 + statuses.count('error')
    assert after['errors'] - before['errors'] == 1


def test_cancel_of_the_running_request_over_ros(graph):
    before = _counters(graph)
    request_id = graph.send('Tell me a long story about a lighthouse.', max_new_tokens=48)
    assert wait_for(graph, lambda: graph.streamed(request_id), 60), 'nothing streamed'
    graph.cancel_pub.publish(String(data=request_id))
    body = graph.responses_for([request_id])[0]
    assert body['status'] == 'cancelled' and 0 < body['tokens'] < 48
    assert _stream_complete(graph, request_id, body['text'])
    assert _counters(graph)['cancelled'] - before['cancelled'] == 1


def test_diagnostics_are_stamped_once_a_period_and_carry_numbers(graph):
    graph.responses_for([graph.send('Name a planet.')])  # steps in the window for this test
    start = len(graph.arrays)
    assert wait_for(graph, lambda: len(graph.arrays) >= start + 4, 10)
    stamps = [_seconds(a.header.stamp) for a in graph.arrays[start:]]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert all(0.9 < g < 1.1 for g in gaps), gaps  # the node's timer, not our arrival times
    array = graph.arrays[-1]
    assert [s.name for s in array.status] == [
        'llm_decoder: decode', 'llm_decoder: gpu', 'llm_decoder: requests']
    assert all(s.hardware_id == 'cpu' for s in array.status)
    assert array.status[0].level == b'\x00', array.status[0].message
    decode = graph.values('decode')
    for key in ('step p50 (ms)', 'step p95 (ms)', 'step p99 (ms)', 'tokens/s', 'floor (ms)',
                'achieved fraction of floor (measured bw)', 'bytes/step'):
        assert float(decode[key]) > 0, key
    assert decode['mode'] == 'eager' and decode['graph fallbacks'] == '0'
    assert graph.values('gpu')['temperature (C)'] == 'unavailable'
    # started without mirror_diagnostics: the node's own topic only, never the global one
    assert graph.count_publishers(f'{NS}/diagnostics') == 1
    assert not [p for p in graph.get_publishers_info_by_topic('/diagnostics')
                if p.node_namespace == NS]


def test_plain_requests_get_ids_no_client_uses(graph):
    # two with ids and the plain one fit the queue (3) even before the first one starts
    ids = [graph.send('Say yes.', id=f'req-{i}', max_new_tokens=4) for i in (1, 2)]
    start = len(graph.all_responses)
    graph._request_pub.publish(String(data='Say no.'))
    assert wait_for(graph, lambda: len(graph.all_responses) > start + 2, 120)
    plain = [r for r in graph.all_responses[start:] if r['id'] not in ids]
    assert len(plain) == 1 and plain[0]['status'] == 'done', plain
    assert not plain[0]['id'].startswith('req-')


def test_ask_and_watch_against_the_node(graph):
    import os
    import subprocess
    import sys
    bin_dir = os.path.dirname(sys.executable)

    def ask(*extra):
        run = subprocess.run([os.path.join(bin_dir, 'ask'), 'Count from one to ten.',
                              '--max-new-tokens', '24', '--system', 'You are terse.', *extra],
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr
        assert 'tokens, first after' in run.stderr
        return run.stdout.rstrip('\n')
    full = ask()
    stop = full.strip().split()[len(full.split()) // 2]  # greedy: the same text again
    cut = ask('--stop', stop)
    assert cut == full[:full.index(stop)], (full, stop, cut)
    refused = subprocess.run([os.path.join(bin_dir, 'ask'), 'Hi.', '--max-new-tokens', '49'],
                             capture_output=True, text=True, timeout=180)
    assert refused.returncode == 1, refused.stderr  # an error response: exit 1, saying why
    assert 'error: ' in refused.stderr and 'between 1 and 48' in refused.stderr
    watch = subprocess.run([os.path.join(bin_dir, 'watch'), '--once', '--timeout', '10'],
                           capture_output=True, text=True, timeout=60)
    assert watch.returncode == 0, watch.stderr
    assert 'llm_decoder: decode' in watch.stdout and 'step p50 (ms)' in watch.stdout
