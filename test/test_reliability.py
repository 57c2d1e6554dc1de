"""Short versions of the recorded reliability runs, against the real node over ROS 2 topics."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('rclpy')
SCRIPT = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'reliability.py')


def run(tmp_path, *args):
    out = tmp_path / 'result.json'
    proc = subprocess.run([sys.executable, SCRIPT, *args, '--out', str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_fuzz_ten_thousand_adversarial_requests(tmp_path):
    r = run(tmp_path, 'fuzz', '--count', '10000')
    assert r['requests'] == r['sent'] == r['responses'] == 10000
    assert r['lost'] == 0 and r['crashes'] == 0 and r['bad_terminal'] == 0
    assert r['by_status'].get('done', 0) > 0 and r['by_status']['error'] > 0
    assert r['largest_request_bytes'] > 2 << 20
    assert r['exit_code'] == 0


def test_flood_of_a_thousand(tmp_path):
    r = run(tmp_path, 'flood', '--count', '1000')
    assert r['unique_ids'] == r['responses'] == 1000 and r['lost'] == 0
    assert r['queue_full'] > 0 and r['done'] > 0 and r['crashes'] == 0
    assert r['rss_after_mib'] - r['rss_before_mib'] < 64


def test_faults_keep_the_node_up(tmp_path):
    r = run(tmp_path, 'faults')['results']
    for name in ('missing model path', 'corrupt model file'):
        assert r[name]['node_alive'] and r[name]['level'] == 2
        assert r[name]['response']['status'] == 'error'
        assert 'model not loaded' in r[name]['response']['error']
    assert 'no such file' in r['missing model path']['message']
    assert r['client vanishes mid-stream']['node_alive']
    assert r['client vanishes mid-stream']['responses'][-1] == 'done'


def test_short_soak(tmp_path):
    r = run(tmp_path, 'soak', '--minutes', '0.3', '--model', 'tiny')
    assert r['requests'] > 3 and r['lost'] == 0 and r['crashes'] == 0
    assert r['done'] == r['requests']
