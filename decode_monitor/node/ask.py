"""`ask`: send one prompt to the llm_decoder node and stream the answer to the terminal."""
import argparse
import json
import sys
import uuid

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from decode_monitor.node.runtime import ros_session, spin_once


class AskClient(Node):
    """Publishes requests and collects the stream and the terminal response for each id.

    Stream and response travel on two topics, so a response may arrive before the last chunks
    of its stream: `unseen_text` is what the response holds beyond what was streamed before it,
    printed once the response is in instead of waiting for chunks that may never be read; with
    `late_chunks=False` the chunks that arrive after their response are not handed to on_text.
    """

    def __init__(self, namespace='/decode', on_text=None, late_chunks=True):
        super().__init__('ask', namespace=namespace)
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self._on_text = on_text
        self._late_chunks = late_chunks
        self.responses = {}
        self._stream_text = {}  # id -> the text streamed so far
        self._stream_sub = self.create_subscription(String, 'stream', self._on_stream, qos)
        self._response_sub = self.create_subscription(String, 'response', self._on_response,
                                                      qos)
        # last: whoever sees the request topic appear sees a client that is whole
        self._request_pub = self.create_publisher(String, 'request', qos)

    def node_ready(self):
        """A node takes our requests and its answers reach us: the request topic has a matched
        subscriber, and our stream and response subscriptions each a matched publisher. A
        refused request is answered at once; published before the node's writer matched our
        reader, that answer would never arrive (volatile topics keep nothing for late readers).
        """
        return (self._request_pub.get_subscription_count() > 0
                and self._response_sub.get_publisher_count() > 0
                and self._stream_sub.get_publisher_count() > 0)

    def send(self, prompt, **options):
        """Publish one request (options: the request's JSON fields); returns its id."""
        request_id = options.pop('id', None) or uuid.uuid4().hex[:12]
        body = {'id': request_id, 'prompt': prompt, **options}
        body = {k: v for k, v in body.items() if v is not None}
        self._request_pub.publish(String(data=json.dumps(body)))
        return request_id

    def _on_stream(self, msg):
        chunk = json.loads(msg.data)
        late = chunk['id'] in self.responses
        if not late:
            self._stream_text[chunk['id']] = self._stream_text.get(chunk['id'], '') + chunk['text']
        if self._on_text is not None and (self._late_chunks or not late):
            self._on_text(chunk['id'], chunk['text'])

    def _on_response(self, msg):
        body = json.loads(msg.data)
        self.responses[body['id']] = body

    def unseen_text(self, request_id):
        """The answer's text after what its stream delivered ('' when nothing is missing)."""
        streamed = self._stream_text.get(request_id, '')
        text = self.responses[request_id].get('text') or ''
        return text[len(streamed):] if text.startswith(streamed) else ''


def wait_for(node, condition, timeout_s):
    """Spin until condition() or the timeout; True when the condition held."""
    deadline = node.get_clock().now().nanoseconds + timeout_s * 1e9
    while not condition():
        if node.get_clock().now().nanoseconds > deadline:
            return False
        spin_once(node, 0.1)
    return True


def main(args=None):
    parser = argparse.ArgumentParser(
        description='Ask the llm_decoder node one question and stream the answer. '
        'Exit code: 0 answered, 1 no node / no answer in time / an error response, 130 Ctrl-C.')
    parser.add_argument('prompt', help='the prompt text')
    parser.add_argument('--namespace', default='/decode')
    parser.add_argument('--system', help='a system message before the prompt (chat models)')
    parser.add_argument('--max-new-tokens', type=int, help="default: the node's")
    parser.add_argument('--temperature', type=float, help='0: greedy (the default)')
    parser.add_argument('--seed', type=int, help='for sampling at temperature > 0')
    parser.add_argument('--stop', action='append', metavar='TEXT',
                        help='stop before this text (repeatable)')
    parser.add_argument('--timeout', type=float, default=300.0,
                        help='seconds to wait for the answer')
    parser.add_argument('--connect-timeout', type=float, default=30.0,
                        help='seconds to wait for a node to subscribe')
    argv = sys.argv if args is None else args
    parsed = parser.parse_args(rclpy.utilities.remove_ros_args(argv)[1:])

    def show(_, text):
        print(text, end='', flush=True)
    messages = None
    if parsed.system:
        messages = [{'role': 'system', 'content': parsed.system},
                    {'role': 'user', 'content': parsed.prompt}]
    try:
        with ros_session(argv):
            client = AskClient(parsed.namespace, on_text=show, late_chunks=False)
            if not wait_for(client, client.node_ready, parsed.connect_timeout):
                ns = parsed.namespace
                missing = (f'subscribes to {ns}/request'
                           if client._request_pub.get_subscription_count() == 0
                           else f'publishes {ns}/stream and {ns}/response to this client')
                print(f'no llm_decoder node {missing}', file=sys.stderr)
                return 1
            request_id = client.send(None if messages else parsed.prompt, messages=messages,
                                     max_new_tokens=parsed.max_new_tokens,
                                     temperature=parsed.temperature, seed=parsed.seed,
                                     stop=parsed.stop)
            if not wait_for(client, lambda: request_id in client.responses, parsed.timeout):
                print('\nno response in time', file=sys.stderr)
                return 1
            body = client.responses[request_id]
            print(client.unseen_text(request_id))
            if body['status'] != 'done':
                print(f'{body["status"]}: {body["error"]}', file=sys.stderr)
                return 1
            print(f'[{body["tokens"]} tokens, first after {body["ttft_ms"]} ms, '
                  f'step p50 {body["step_ms_p50"]} ms]', file=sys.stderr)
    except (KeyboardInterrupt, ExternalShutdownException):
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
