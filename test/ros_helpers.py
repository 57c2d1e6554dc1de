"""Shared helpers for the tests that run the real node process over real rclpy topics."""
import json
import os
import subprocess
import sys
import time

from diagnostic_msgs.msg import DiagnosticArray
from std_msgs.msg import String

from decode_monitor.node.ask import AskClient, wait_for

EXECUTABLE = os.path.join(os.path.dirname(sys.executable), 'llm_decoder')


def start_node(namespace, *params, name=None, params_file=None):
    """The node's console script in its own process, in `namespace`; `params_file` for values
    the command line cannot carry (long text)."""
    remaps = ['-r', f'__ns:={namespace}'] + (['-r', f'__node:={name}'] if name else [])
    args = [a for p in params for a in ('-p', p)]
    args += ['--params-file', params_file] if params_file else []
    return subprocess.Popen([EXECUTABLE, '--ros-args', *remaps, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Client(AskClient):
    """AskClient that also keeps every response in arrival order, every stream chunk and
    every diagnostics array (with its header stamp)."""

    def __init__(self, namespace):
        super().__init__(namespace, on_text=None)
        self.all_responses, self.chunks, self.arrays = [], [], []
        self._on_text = lambda request_id, text: self.chunks.append((request_id, text))
        self.create_subscription(String, f'{namespace}/response',
                                 lambda m: self.all_responses.append(json.loads(m.data)), 1000)
        self.create_subscription(DiagnosticArray, f'{namespace}/diagnostics',
                                 self.arrays.append, 10)
        self.cancel_pub = self.create_publisher(String, f'{namespace}/cancel', 10)

    def streamed(self, request_id):
        return ''.join(t for i, t in self.chunks if i == request_id)

    def values(self, part, prefix='llm_decoder'):
        """The key/values of the latest status named '<prefix>: <part>'."""
        for array in reversed(self.arrays):
            for status in array.status:
                if status.name == f'{prefix}: {part}':
                    return {kv.key: kv.value for kv in status.values}
        return {}

    def wait_ready(self, timeout=240, prefix='llm_decoder'):
        assert wait_for(self, self.node_ready, 60), 'node did not connect its topics to the client'
        assert wait_for(self, lambda: self.values('decode', prefix).get('state') == 'ready',
                        timeout), 'model did not load'

    def responses_for(self, ids, timeout=120):
        assert wait_for(self, lambda: all(i in self.responses for i in ids), timeout), (
            f'no response for {[i for i in ids if i not in self.responses]}')
        return [self.responses[i] for i in ids]


def stop_node(node, sig, timeout=60):
    node.send_signal(sig)
    try:
        out, _ = node.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        node.kill()
        out, _ = node.communicate()
        raise AssertionError(f'node did not exit after {sig!r}:\n{out}')
    return out


def spin_for(client, seconds):
    end = time.monotonic() + seconds
    wait_for(client, lambda: time.monotonic() > end, seconds + 1)
