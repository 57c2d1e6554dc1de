"""`ask` and `watch` as users run them, with no node to talk to: exit codes and what they say."""
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip('rclpy')
BIN = os.path.dirname(sys.executable)


def test_ask_without_a_node_exits_1_and_says_why():
    run = subprocess.run([os.path.join(BIN, 'ask'), 'hello', '--namespace', '/nobody',
                          '--connect-timeout', '2'], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert 'no llm_decoder node subscribes to /nobody/request' in run.stderr


def test_watch_once_without_messages_exits_1_and_says_why():
    run = subprocess.run([os.path.join(BIN, 'watch'), '--once', '--topic', '/nobody/diag',
                          '--timeout', '2'], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert 'no message on /nobody/diag' in run.stderr


def test_ask_refuses_bad_arguments_with_usage():
    run = subprocess.run([os.path.join(BIN, 'ask'), 'x', '--max-new-tokens', 'many'],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and 'invalid int value' in run.stderr


ASK = ['ask', 'hello', '--namespace', '/nobody', '--connect-timeout', '120']
WATCH = ['watch', '--topic', '/nobody/diag']


@pytest.mark.parametrize('command, topic, sig, code', [
    (ASK, '/nobody/request', signal.SIGINT, 130),
    (WATCH, '/nobody/diag', signal.SIGINT, 0),
    (WATCH, '/nobody/diag', signal.SIGTERM, 0),
], ids=['ask-SIGINT', 'watch-SIGINT', 'watch-SIGTERM'])
def test_a_signal_while_waiting_exits_with_the_documented_code(command, topic, sig, code):
    """Ctrl-C while waiting: `ask` exits 130 (the shell's code for SIGINT); `watch`, a viewer,
    exits 0 on SIGINT and SIGTERM. Either way without a traceback."""
    import rclpy
    from decode_monitor.node.ask import wait_for
    proc = subprocess.Popen([os.path.join(BIN, command[0]), *command[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rclpy.init()
    try:
        probe = rclpy.create_node('probe')
        # signalled once it is waiting: its request publisher or diagnostics subscription is up
        assert wait_for(probe, lambda: probe.count_publishers(topic)
                        + probe.count_subscribers(topic) > 0, 60), 'it never started'
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err
        assert 'Traceback' not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        rclpy.try_shutdown()


def test_a_spin_after_a_signal_shut_the_context_down_is_an_external_shutdown():
    """What a client's loop meets when SIGINT or SIGTERM lands between two spins: rclpy's handler
    has shut the context down, and with it reset the global executor, which cannot be made again
    on a dead context (RCLError, a traceback and exit 1 from `watch` on SIGTERM). runtime's
    spin_once turns that into the ExternalShutdownException the clients handle."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from decode_monitor.node import runtime
    rclpy.init()
    node = rclpy.create_node('spin_after_shutdown')
    try:
        runtime.spin_once(node, 0.01)  # a live context: spins, nothing to do
        rclpy.shutdown()  # what the signal handler does
        with pytest.raises(ExternalShutdownException):
            runtime.spin_once(node, 0.01)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def test_ask_prints_what_a_response_holds_beyond_a_late_stream():
    """The response overtook its last chunk: ask prints the rest once, late chunks are not
    printed again (message objects, no ROS graph)."""
    import json

    import rclpy
    from std_msgs.msg import String

    from decode_monitor.node.ask import AskClient
    shown = []
    rclpy.init()
    try:
        client = AskClient(on_text=lambda _, text: shown.append(text), late_chunks=False)

        def deliver(callback, body):
            callback(String(data=json.dumps(body)))
        deliver(client._on_stream, {'id': 'a', 'text': 'Hello'})
        deliver(client._on_response, {'id': 'a', 'status': 'done', 'text': 'Hello, robot.'})
        assert client.unseen_text('a') == ', robot.'
        deliver(client._on_stream, {'id': 'a', 'text': ', robot.'})  # the late chunk
        assert shown == ['Hello'] and client.unseen_text('a') == ', robot.'
        deliver(client._on_response, {'id': 'b', 'status': 'error', 'text': '', 'error': 'x'})
        assert client.unseen_text('b') == ''
        client.destroy_node()
    finally:
        rclpy.shutdown()
