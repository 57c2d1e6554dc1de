"""Reliability runs against the real llm_decoder node process over real ROS 2 topics.

    python benchmarks/reliability.py fuzz --count 10000 --out fuzz.json
    python benchmarks/reliability.py flood --count 1000 --out flood.json
    python benchmarks/reliability.py soak --minutes 30 --out soak.json
    python benchmarks/reliability.py faults --out faults.json

Each prints a one-line summary and writes JSON. The invariant checked everywhere: every request
message gets exactly one terminal response, counted per request id (a duplicate must not hide a
loss); the node process never dies.
"""
import argparse
from collections import Counter as Tally
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time

from hypothesis import given, HealthCheck, seed, settings, strategies as st
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import Float32, String

from decode_monitor.serving.protocol import parse_request, RequestError

EXECUTABLE = os.path.join(os.path.dirname(sys.executable), 'llm_decoder')
TERMINAL = {'done', 'error', 'cancelled'}
_client_ids = itertools.count()
ANONYMOUS = '<id given by the node>'


# -- the node under test -------------------------------------------------------------------
class NodeProcess:
    def __init__(self, namespace, **params):
        args = [EXECUTABLE, '--ros-args', '-r', f'__ns:={namespace}']
        for key, value in params.items():
            args += ['-p', f'{key}:={value}']
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)

    def alive(self):
        return self.process.poll() is None

    def rss_mib(self):
        with open(f'/proc/{self.process.pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024
        return math.nan

    def stop(self):
        if self.alive():
            self.process.send_signal(signal.SIGINT)
        try:
            out, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return self.process.returncode, out


class Counter(Node):
    """Publishes raw request strings; counts every response, stream chunk and diagnostics."""

    def __init__(self, namespace):
        super().__init__(f'reliability_client_{next(_client_ids)}', namespace=namespace)
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.request_pub = self.create_publisher(String, 'request', qos)
        self.cancel_pub = self.create_publisher(String, 'cancel', qos)
        self.responses, self.chunks, self.latencies, self.arrays = [], [], [], []
        self.create_subscription(String, 'response',
                                 lambda m: self.responses.append(json.loads(m.data)), qos)
        self.create_subscription(String, 'stream',
                                 lambda m: self.chunks.append(json.loads(m.data)), qos)
        self.create_subscription(Float32, 'step_latency',
                                 lambda m: self.latencies.append(m.data), qos)
        self.create_subscription(DiagnosticArray, 'diagnostics', self.arrays.append, 10)

    def spin_until(self, condition, timeout_s):
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            rclpy.spin_once(self, timeout_sec=0.05)
        return condition()

    def decode_values(self):
        if not self.arrays:
            return {}
        status = self.arrays[-1].status[0]
        return {kv.key: kv.value for kv in status.values} | {'_level': status.level[0],
                                                             '_message': status.message}


def start(namespace, **params):
    node = NodeProcess(namespace, **params)
    client = Counter(namespace)
    up = client.spin_until(lambda: client.request_pub.get_subscription_count() > 0, 60)
    up = up and client.spin_until(
        lambda: client.decode_values().get('state') in ('ready', 'failed'), 300)
    if not up:
        code, out = node.stop()
        raise RuntimeError(f'node did not come up (exit {code}):\n{out}')
    return node, client


def send_paced(client, node, messages, outstanding=200, timeout_s=600):
    """Publish, keeping at most `outstanding` unanswered, so DDS history never overwrites."""
    sent = 0
    deadline = time.monotonic() + timeout_s
    base = len(client.responses)
    for raw in messages:
        client.spin_until(lambda: sent - (len(client.responses) - base) < outstanding,
                          max(0.0, deadline - time.monotonic()))
        client.request_pub.publish(String(data=raw))
        sent += 1
        if not node.alive():
            break
    client.spin_until(lambda: len(client.responses) - base >= sent or not node.alive(),
                      max(1.0, deadline - time.monotonic()))
    return sent, len(client.responses) - base


MADE_UP = re.compile(r'node-[0-9a-f]{8}-[0-9]+\Z')  # the node's ids for requests without one


def per_id(expected, responses):
    """Compare the ids requests carried (a Tally) with the ids of the terminal responses.

    Ids the node makes up for requests without one are pooled as ANONYMOUS and must not repeat.
    Returns lost (requests without a response), duplicated (responses beyond one per request)
    and unexpected (responses to ids never sent) counts.
    """
    got = Tally(ANONYMOUS if MADE_UP.match(r['id']) else r['id'] for r in responses)
    made_up = Tally(r['id'] for r in responses if MADE_UP.match(r['id']))
    lost = sum(max(0, n - got[i]) for i, n in expected.items())
    duplicated = sum(max(0, n - expected[i]) for i, n in got.items() if i in expected)
    duplicated += sum(n - 1 for n in made_up.values())
    unexpected = sum(n for i, n in got.items() if i not in expected)
    return lost, duplicated, unexpected


def carried_id(raw):
    """The id a request message carries, or ANONYMOUS where the node has to make one up."""
    try:
        request_id = parse_request(raw, new_id=lambda: None).id
    except RequestError as exc:
        request_id = exc.request_id
    return ANONYMOUS if request_id is None else request_id


# -- inputs --------------------------------------------------------------------------------
_text = st.text(st.characters(codec='utf-8'), max_size=64) | st.sampled_from(
    ['', ' ', '\x00', '\u202e', '\ud7ff', '🤖' * 50, '\r\n\t', 'NaN', '{', '"', '\\'])
_numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([0, 1, 4, -1, 1e308, 2**63]))
_values = st.recursive(st.none() | st.booleans() | _numbers | _text,
                       lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(_text, inner, max_size=4), max_leaves=12)
_fields = st.sampled_from(['id', 'prompt', 'messages', 'max_new_tokens', 'temperature',
                           'top_p', 'top_k', 'seed', 'stop', 'chat', 'extra', 'max_tokens'])
_objects = st.dictionaries(_fields, _values | st.sampled_from(
    ['hi', 'dup', [{'role': 'user', 'content': 'hi'}], 2, 0.7]), max_size=6)


def _as_json(obj):
    return json.dumps(obj, allow_nan=True, ensure_ascii=False)


_raw = st.one_of(
    _objects.map(_as_json),  # well-formed JSON, mostly invalid requests
    _objects.map(_as_json).flatmap(lambda s: st.integers(0, len(s)).map(lambda i: s[:i])),
    _text,  # plain text: a prompt, unless blank
    st.integers(1, 5000).map(lambda depth: '{"a": ' * depth + '1' + '}' * depth),
    st.integers(1, 3).map(lambda mib: '{"prompt": "' + 'x' * (mib << 20) + '"}'),
    st.sampled_from(['{"id": "dup", "prompt": "hi", "max_new_tokens": 4}'] * 3),
)


def generate_requests(count):
    """`count` distinct adversarial request strings drawn by hypothesis (same list every run)."""
    out, seen = [], set()

    def collect(raw):
        if raw not in seen:
            seen.add(raw)
            out.append(raw)
    for round_seed in range(1000):
        if len(out) >= count:
            break
        draw = settings(max_examples=count, database=None, deadline=None,
                        suppress_health_check=list(HealthCheck))(given(_raw)(collect))
        seed(round_seed)(draw)()
    return out[:count]


# -- runs ----------------------------------------------------------------------------------
NODE_PARAMS = dict(model='tiny', max_context=256, default_max_new_tokens=4, max_new_tokens_cap=8,
                   queue_size=16)


def run_fuzz(args):
    messages = generate_requests(args.count)
    node, client = start('/fuzz', **NODE_PARAMS)
    t0 = time.monotonic()
    sent, answered = send_paced(client, node, messages)
    alive = node.alive()
    code, out = node.stop()
    kinds = {}
    for r in client.responses:
        kinds[r['status']] = kinds.get(r['status'], 0) + 1
    lost, duplicated, unexpected = per_id(Tally(map(carried_id, messages[:sent])),
                                          client.responses)
    return dict(run='fuzz', requests=len(messages), sent=sent, responses=answered,
                lost=lost, duplicated=duplicated, unexpected=unexpected,
                crashes=0 if alive else 1, exit_code=code,
                by_status=kinds, largest_request_bytes=max(len(m.encode()) for m in messages),
                bad_terminal=sum(r['status'] not in TERMINAL for r in client.responses),
                seconds=time.monotonic() - t0,
                **({'node_output_tail': out[-4000:]} if code else {}))


def run_flood(args):
    node, client = start('/flood', **NODE_PARAMS)
    rss_before = node.rss_mib()
    t0 = time.monotonic()
    ids = [f'f{i}' for i in range(args.count)]
    for request_id in ids:  # as fast as the publisher goes: no pacing
        client.request_pub.publish(String(data=json.dumps({'id': request_id, 'prompt': 'go'})))
    client.spin_until(lambda: len(client.responses) >= args.count, 300)
    client.spin_until(lambda: False, 1.0)  # a response beyond one per id would arrive now
    seconds = time.monotonic() - t0
    rss_after = node.rss_mib()
    alive = node.alive()
    node.stop()
    lost, duplicated, unexpected = per_id(Tally(ids), client.responses)
    full = sum('queue full' in (r['error'] or '') for r in client.responses)
    return dict(run='flood', requests=args.count, responses=len(client.responses),
                unique_ids=len({r['id'] for r in client.responses}), lost=lost,
                duplicated=duplicated, unexpected=unexpected, queue_full=full,
                done=sum(r['status'] == 'done' for r in client.responses),
                bad_terminal=sum(r['status'] not in TERMINAL for r in client.responses),
                crashes=0 if alive else 1, rss_before_mib=rss_before, rss_after_mib=rss_after,
                seconds=seconds)


def run_soak(args):
    """Requests one after another for `--minutes`, or until `--requests` have been answered."""
    node, client = start('/soak', model=args.model, max_context=1024,
                         default_max_new_tokens=48, max_new_tokens_cap=64)
    prompts = ['Describe a robot arm.', 'List three sensors.', 'What is odometry?',
               'Explain a PID loop in one sentence.']
    end = time.monotonic() + args.minutes * 60
    samples, ids = [], []
    while node.alive() and (len(ids) < args.requests if args.requests
                            else time.monotonic() < end):
        before = len(client.latencies)
        ids.append(f's{len(ids)}')
        client.request_pub.publish(String(data=json.dumps(
            {'id': ids[-1], 'prompt': prompts[len(ids) % len(prompts)]})))
        client.spin_until(lambda: any(r['id'] == ids[-1] for r in client.responses), 300)
        samples.append(dict(t=args.minutes * 60 - (end - time.monotonic()),
                            rss_mib=node.rss_mib(),
                            step_ms=statistics.median(client.latencies[before:] or [math.nan])))
    client.spin_until(lambda: False, 1.0)  # a response beyond one per id would arrive now
    alive = node.alive()
    node.stop()
    lost, duplicated, unexpected = per_id(Tally(ids), client.responses)
    k = max(1, len(samples) // 6)  # first and last sixth of the run
    first, last = samples[:k], samples[-k:]

    def med(rows, key):
        return statistics.median(r[key] for r in rows)
    return dict(run='soak', minutes=None if args.requests else args.minutes, model=args.model,
                requests=len(ids),
                responses=len(client.responses), lost=lost, duplicated=duplicated,
                unexpected=unexpected, done=sum(r['status'] == 'done' for r in client.responses),
                crashes=0 if alive else 1,
                step_ms_first=med(first, 'step_ms'), step_ms_last=med(last, 'step_ms'),
                step_drift=med(last, 'step_ms') / med(first, 'step_ms') - 1,
                rss_first_mib=med(first, 'rss_mib'), rss_last_mib=med(last, 'rss_mib'),
                rss_drift_mib=med(last, 'rss_mib') - med(first, 'rss_mib'), samples=samples)


def run_faults(args):
    results = {}
    for name, model in (('missing model path', '/nonexistent/model'),
                        ('corrupt model file', _corrupt_file())):
        node, client = start('/faults', model=model)
        values = client.decode_values()
        client.request_pub.publish(String(data='hello'))
        client.spin_until(lambda: client.responses, 30)
        alive = node.alive()
        node.stop()
        results[name] = dict(level=values.get('_level'), message=values.get('_message'),
                             response=client.responses[0] if client.responses else None,
                             node_alive=alive)
    node, client = start('/faults', **NODE_PARAMS | dict(max_new_tokens_cap=200))
    asker = subprocess.Popen([sys.executable, '-m', 'decode_monitor.node.ask', '--namespace',
                              '/faults', '--max-new-tokens', '200', 'a long story'],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    client.spin_until(lambda: client.chunks, 60)
    asker.kill()  # the client vanishes mid-stream
    asker.wait()
    # the scenario happened only if text had streamed and the request was not finished yet
    chunks_before_kill = len(client.chunks)
    stream_id = client.chunks[0]['id'] if client.chunks else None
    answered_before_kill = any(r['id'] == stream_id for r in client.responses)
    client.spin_until(lambda: any(r['id'] == stream_id for r in client.responses), 60)
    client.request_pub.publish(String(data=json.dumps({'id': 'after', 'prompt': 'hi'})))
    client.spin_until(lambda: any(r['id'] == 'after' for r in client.responses), 60)
    client.spin_until(lambda: False, 1.0)  # a response beyond one per id would arrive now
    alive = node.alive()
    node.stop()
    results['client vanishes mid-stream'] = dict(
        chunks_before_kill=chunks_before_kill, answered_before_kill=answered_before_kill,
        killed_request=[r['status'] for r in client.responses if r['id'] == stream_id],
        after=[r['status'] for r in client.responses if r['id'] == 'after'],
        responses=[r['status'] for r in client.responses], node_alive=alive)
    return dict(run='faults', results=results)


def _corrupt_file():
    path = os.path.join(os.environ.get('TMPDIR', '/tmp'), 'decode_monitor_corrupt.gguf')
    with open(path, 'wb') as f:
        f.write(b'GGUF' + os.urandom(4096))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('run', choices=['fuzz', 'flood', 'soak', 'faults'])
    parser.add_argument('--count', type=int, default=None)
    parser.add_argument('--minutes', type=float, default=30.0)
    parser.add_argument('--requests', type=int, default=None,
                        help='soak: stop after this many requests instead of after --minutes')
    parser.add_argument('--model', default='smollm2')
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)
    args.count = args.count or {'fuzz': 10000, 'flood': 1000}.get(args.run, 0)
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    rclpy.init()
    try:
        result = {'fuzz': run_fuzz, 'flood': run_flood, 'soak': run_soak,
                  'faults': run_faults}[args.run](args)
    finally:
        rclpy.shutdown()
    result['date'] = time.strftime('%Y-%m-%d %H:%M:%S')
    result['command'] = ' '.join(['python', 'benchmarks/reliability.py'] + (argv or sys.argv[1:]))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != 'samples'}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
