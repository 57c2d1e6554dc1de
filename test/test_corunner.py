"""Co-runner processes for real: started, doing work, stopped, and gone; and every way one can
fail (cannot start, dies before it is ready, dies while the steps run, ignores SIGTERM, outlives
a parent that was killed) reported without a hang."""
import os
import subprocess
import sys
import time

import pytest

from decode_monitor.bench.corunner import CoRunner, CoRunnerError

PY = sys.executable


def gone(pid, timeout_s=10.0):
    """The process ended: no /proc entry, or a zombie nobody reaped yet."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize('kind, unit', [('copy', 'GB/s (read + write)'), ('matmul', 'TFLOP/s'),
                                        ('idle', None)])
def test_built_in_loops_run_on_the_cpu_and_stop(kind, unit):
    runner = CoRunner(kind, 'cpu').start()
    pid = runner.proc.pid
    assert pid != os.getpid() and not gone(pid, 0.0)
    with open(f'/proc/{pid}/cmdline') as f:
        assert f.read().split('\0')[-3:-1] == [kind, 'cpu']
    time.sleep(0.5)
    report = runner.stop()
    assert gone(pid)
    assert report['status'] == 'ran' and report['stopped_by'] == 'SIGTERM'
    assert report['exit_code'] == 0 and report['pid'] == pid and report['unit'] == unit
    if kind == 'idle':
        assert report['iterations'] == 0 and report['rate'] is None
    else:
        assert report['iterations'] > 0 and report['rate'] > 0
    assert runner.stop() == report  # a second stop changes nothing


def test_a_command_runs_with_its_own_pid_and_is_stopped():
    with CoRunner('sleep 30', 'cpu', settle_s=0.3) as runner:
        pid = runner.proc.pid
        with open(f'/proc/{pid}/cmdline') as f:
            assert f.read() == 'sleep\x0030\x00'  # the launcher exec'd the command itself
    assert gone(pid) and runner.report()['status'] == 'ran'


def test_a_command_that_cannot_start_is_reported():
    runner = CoRunner('no-such-command --flag', 'cpu')
    with pytest.raises(CoRunnerError, match="co-runner 'no-such-command --flag': exited with "
                       "code 127 before it was ready: corunner: cannot run 'no-such-command': "
                       'No such file or directory'):
        runner.start()
    report = runner.report()
    assert report['status'] == 'failed' and report['exit_code'] == 127 and gone(report['pid'])


def test_one_that_dies_before_it_is_ready_is_reported_with_its_output():
    runner = CoRunner(f'{PY} -c "import sys; print(\'no GPU here\'); sys.exit(3)"', 'cpu',
                      settle_s=5.0)
    with pytest.raises(CoRunnerError, match='exited with code 3 before it was ready: no GPU here'):
        runner.start()
    assert runner.report()['log_tail'] == 'no GPU here'


def test_one_that_dies_while_the_steps_run_is_reported():
    runner = CoRunner(f'{PY} -c "import time, sys; time.sleep(0.8); sys.exit(4)"', 'cpu',
                      settle_s=0.3).start()
    assert gone(runner.proc.pid)
    report = runner.stop()
    assert report['status'] == 'died' and report['exit_code'] == 4
    assert report['reason'] == 'exited with code 4 while the steps ran'


def test_one_that_ignores_sigterm_is_killed_after_the_grace():
    code = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'
    runner = CoRunner(f'{PY} -c "{code}"', 'cpu', settle_s=1.0, grace_s=0.5).start()
    t0 = time.monotonic()
    report = runner.stop()
    assert time.monotonic() - t0 < 5
    assert report['stopped_by'] == 'SIGKILL' and report['exit_code'] == -9
    assert gone(report['pid'])


def test_a_built_in_not_ready_in_time_is_killed():
    runner = CoRunner('copy', 'cpu', ready_timeout_s=0.05)
    with pytest.raises(CoRunnerError, match='not ready after 0.05 s'):
        runner.start()
    assert gone(runner.report()['pid'])


@pytest.mark.parametrize('spec', ['sleep 60', 'idle'])
def test_no_co_runner_outlives_a_parent_that_was_killed(spec):
    code = ('import sys, time; from decode_monitor.bench.corunner import CoRunner; '
            "r = CoRunner(sys.argv[1], 'cpu', settle_s=0.3).start(); print(r.proc.pid, "
            'flush=True); time.sleep(120)')
    parent = subprocess.Popen([PY, '-c', code, spec], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not gone(child, 0.0)
    finally:
        parent.kill()
        parent.wait()
    assert gone(child)
