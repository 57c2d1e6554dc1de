"""`watch`: live view of /decode/diagnostics (rqt needs a desktop; this works over ssh)."""
import argparse
import sys

from diagnostic_msgs.msg import DiagnosticArray
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from decode_monitor.node.runtime import ros_session, spin_once

LEVELS = {0: 'OK', 1: 'WARN', 2: 'ERROR', 3: 'STALE'}
_KEYS = {  # the values worth a glance; the full set is one `ros2 topic echo` away
    'decode': ('state', 'model', 'backend', 'mode', 'step p50 (ms)', 'step p95 (ms)',
               'tokens/s', 'context length (tokens)', 'floor (ms)',
               'achieved fraction of floor (peak bw)', 'achieved fraction of floor (measured bw)'),
    'gpu': ('name', 'sm clock (MHz)', 'temperature (C)', 'power (W)', 'throttle reasons'),
    'requests': ('queue depth', 'served', 'rejected', 'cancelled', 'errors',
                 'time to first token p50 (ms)'),
}


def format_array(array, full=False):
    lines = []
    for status in array.status:
        level = LEVELS.get(status.level[0] if isinstance(status.level, bytes) else status.level)
        lines.append(f'[{level:5}] {status.name}: {status.message}  ({status.hardware_id})')
        wanted = _KEYS.get(status.name.rsplit(': ', 1)[-1])
        for kv in status.values:
            if full or wanted is None or kv.key in wanted:
                lines.append(f'        {kv.key:42} {kv.value}')
    return '\n'.join(lines)


class DiagnosticsWatcher(Node):
    def __init__(self, topic, on_array):
        super().__init__('decode_watch')
        self.create_subscription(DiagnosticArray, topic, on_array, 10)


def main(args=None):
    parser = argparse.ArgumentParser(
        description='Live view of the llm_decoder diagnostics. Exit code: 0, or 1 when --once '
        'saw no message within --timeout seconds.')
    parser.add_argument('--topic', default='/decode/diagnostics')
    parser.add_argument('--once', action='store_true', help='print one message and exit')
    parser.add_argument('--full', action='store_true', help='every key, not a summary')
    parser.add_argument('--timeout', type=float, default=10.0,
                        help='with --once: seconds to wait for a message')
    argv = sys.argv if args is None else args
    parsed = parser.parse_args(rclpy.utilities.remove_ros_args(argv)[1:])
    done = []

    def show(array):
        text = format_array(array, parsed.full)
        if parsed.once:
            print(text)
            done.append(True)
        else:
            print('\033[2J\033[H' + text, flush=True)  # redraw in place, like `top`
    try:
        with ros_session(argv):
            node = DiagnosticsWatcher(parsed.topic, show)
            deadline = node.get_clock().now().nanoseconds + parsed.timeout * 1e9
            while not done:
                spin_once(node, 0.5)
                if parsed.once and node.get_clock().now().nanoseconds > deadline:
                    print(f'no message on {parsed.topic} in {parsed.timeout} s',
                          file=sys.stderr)
                    return 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
