"""A signal to the real node process while it decodes: every request still gets its answer."""
import signal

import pytest

rclpy = pytest.importorskip('rclpy')
from decode_monitor.node.ask import wait_for  # noqa: E402
from ros_helpers import Client, spin_for, start_node, stop_node  # noqa: E402


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_signal_answers_the_running_and_every_queued_request_once(sig):
    ns = f'/shutdown_{sig.name.lower()}'
    node = start_node(ns, 'max_context:=256', 'max_new_tokens_cap:=200', 'queue_size:=8')
    rclpy.init()
    try:
        client = Client(ns)
        client.wait_ready()
        running = client.send('Tell me a long story about a robot.', max_new_tokens=200,
                              id='running')
        queued = [client.send('Say hello.', id=f'queued-{i}') for i in range(5)]
        assert wait_for(client, lambda: client.streamed('running'), 120), 'nothing streamed'
        assert not client.all_responses  # the signal comes while all six are pending
        out = stop_node(node, sig)
        assert wait_for(client, lambda: len(client.responses) == 6, 10), out
        spin_for(client, 1.0)  # a second answer for any id would arrive now
        ids = [r['id'] for r in client.all_responses]
        assert sorted(ids) == sorted([running] + queued), out  # each exactly once
        for body in client.all_responses:
            assert body['status'] == 'error' and body['error'] == 'the node is shutting down'
        body = client.responses['running']
        assert 0 < body['tokens'] < 200 and client.streamed('running') == body['text']
        assert node.returncode == 0, out
        assert f'{sig.name}: answering pending requests' in out
    finally:
        if node.poll() is None:
            node.kill()
        rclpy.try_shutdown()
