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


def test_fuzz_three_thousand_adversarial_requests(tmp_path):
    # the recorded run sends 10 000 (benchmarks/reliability.py's default); 3000 here
    r = run(tmp_path, 'fuzz', '--count', '3000')
    assert r['requests'] == r['sent'] == r['responses'] == 3000
    # exactly one terminal response per request id: none lost, none twice, none made up
    assert (r['lost'], r['duplicated'], r['unexpected']) == (0, 0, 0)
    assert r['crashes'] == 0 and r['bad_terminal'] == 0
    assert r['by_status'].get('done', 0) > 0 and r['by_status']['error'] > 0
    assert r['largest_request_bytes'] > 2 << 20
    assert r['exit_code'] == 0, r.get('node_output_tail')


def test_flood_of_a_thousand(tmp_path):
    r = run(tmp_path, 'flood', '--count', '1000')
    assert r['unique_ids'] == r['responses'] == 1000
    assert (r['lost'], r['duplicated'], r['unexpected'], r['bad_terminal']) == (0, 0, 0, 0)
    assert r['queue_full'] > 0 and r['done'] > 0 and r['crashes'] == 0
    assert r['rss_after_mib'] - r['rss_before_mib'] < 64


def test_faults_keep_the_node_up(tmp_path):
    r = run(tmp_path, 'faults')['results']
    for name in ('missing model path', 'corrupt model file'):
        assert r[name]['node_alive'] and r[name]['level'] == 2
        assert r[name]['response']['status'] == 'error'
        assert 'model not loaded' in r[name]['response']['error']
    assert 'no such file' in r['missing model path']['message']
    vanished = r['client vanishes mid-stream']
    # the scenario happened: text had streamed to the client, and the request was still running
    assert vanished['chunks_before_kill'] > 0 and not vanished['answered_before_kill']
    assert vanished['node_alive']
    assert len(vanished['killed_request']) == 1 and vanished['killed_request'][0] in (
        'done', 'cancelled', 'error')
    assert vanished['after'] == ['done']


def test_short_soak(tmp_path):
    r = run(tmp_path, 'soak', '--requests', '4', '--model', 'tiny')  # a count, not a clock
    assert r['requests'] == r['responses'] == r['done'] == 4
    assert (r['lost'], r['duplicated'], r['unexpected'], r['crashes']) == (0, 0, 0, 0)
