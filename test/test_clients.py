"""`ask` and `watch` as users run them, with no node to talk to: they say so and exit 1."""
import os
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
