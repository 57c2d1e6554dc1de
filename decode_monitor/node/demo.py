"""`demo`: start the node on the embedded model, ask it a few things, show its diagnostics, exit.

The README's first command runs this: the whole runtime path (node process, topics, streaming,
one response per request, live diagnostics) on any machine, in about a minute.
"""
import argparse
import os
import signal
import subprocess
import sys

from diagnostic_msgs.msg import DiagnosticArray

from decode_monitor.node.ask import AskClient, wait_for
from decode_monitor.node.runtime import ros_session
from decode_monitor.node.watch import format_array

PROMPTS = [
    'What is the capital of France?',
    'Name three things a mobile robot needs to navigate a building.',
    'Write one sentence about batteries.',
]


def main(args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='smollm2')
    parser.add_argument('--max-new-tokens', type=int, default=48)
    parser.add_argument('--timeout', type=float, default=600.0)
    parsed = parser.parse_args(args)
    node = subprocess.Popen(
        [sys.executable, '-m', 'decode_monitor.node.decoder_node', '--ros-args',
         '-r', '__ns:=/decode', '-p', f'model:={parsed.model}'], env=os.environ)
    arrays = []
    try:
        with ros_session():
            def show(request_id, text):
                print(text, end='', flush=True)
            client = AskClient('/decode', on_text=show)
            client.create_subscription(DiagnosticArray, '/decode/diagnostics',
                                       arrays.append, 10)
            if not wait_for(client, client.node_ready, 60):
                print('the node did not come up', file=sys.stderr)
                return 1
            print('node is up; the model loads while requests queue')
            for prompt in PROMPTS:
                print(f'\n>>> {prompt}\n', end='', flush=True)
                request_id = client.send(prompt, max_new_tokens=parsed.max_new_tokens)
                if not wait_for(client, lambda: request_id in client.responses, parsed.timeout):
                    print('\nno response in time', file=sys.stderr)
                    return 1
                body = client.responses[request_id]
                print(f'\n    [{body["status"]}: {body["tokens"]} tokens, first token after '
                      f'{body["ttft_ms"]} ms, step p50 {body["step_ms_p50"]} ms]')
                if body['status'] != 'done':
                    print(f'    error: {body["error"]}', file=sys.stderr)
                    return 1
            count = len(arrays)
            wait_for(client, lambda: len(arrays) > count, 5)
            print('\n/decode/diagnostics, latest:\n' + format_array(arrays[-1]))
    finally:
        node.send_signal(signal.SIGINT)
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()
    return 0


if __name__ == '__main__':
    sys.exit(main())
