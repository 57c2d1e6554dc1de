"""Co-runners: another process loading the device while a cell's steps are timed.

A robot decodes while perception runs on the same GPU; a co-runner stands in for the other
work. Built in (run as `python -m decode_monitor.bench.corunner KIND DEVICE`):

    copy    device-to-device copies of a buffer (1 GiB on a GPU, 64 MiB on a CPU): bandwidth
    matmul  products of two square matrices (bf16 8192 on a GPU, float32 512 on a CPU): compute
    idle    holds the copy buffers (and on a GPU a CUDA context) and runs nothing

Any other co-runner is a command line, split as a shell would (shlex) and run without one
(`python -m decode_monitor.bench.corunner exec CMD...` starts it: same pid, see below).

Each runs in its own session (process group), its output in a log file that nothing has to
drain. A built-in prints READY once its buffers exist and its first unit of work ran, loops until
SIGTERM, then prints its RESULT (iterations, seconds, rate); a command is ready once it has
stayed alive `settle_s`. `stop()` sends SIGTERM to the group, SIGKILL after `grace_s`, and
reaps the process: none outlives its cell. If the parent dies first, the kernel ends the
co-runner: the co-runner asks for that itself (PR_SET_PDEATHSIG, Linux), before it imports
anything or execs a command, because the parent is multi-threaded (CUDA, OpenMP) and a
`preexec_fn` there could deadlock. A co-runner that cannot start, is not ready in time, or exits
before it is stopped is reported (`report()`), never waited on without a limit.
"""
import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

BUILTIN = ('copy', 'matmul', 'idle')
READY = '@@corunner ready'
RESULT = '@@corunner result '
_PR_SET_PDEATHSIG = 1


class CoRunnerError(RuntimeError):
    """The co-runner could not be started, or ended before it was ready."""


def command(spec, device):
    """The argv a co-runner spec runs: a built-in's, or the command split (shlex)."""
    if spec in BUILTIN:
        return [spec, device]
    return shlex.split(spec)


def _launcher(argv):
    return [sys.executable, '-m', 'decode_monitor.bench.corunner'] + (
        argv if argv[0] in BUILTIN else ['exec'] + argv)


def _die_with_parent():
    """SIGKILL this process when its parent dies (Linux; elsewhere a no-op). Kept across exec."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class CoRunner:
    """One co-runner process: start() before the timed steps, stop() after (always)."""

    def __init__(self, spec, device='cuda', ready_timeout_s=120.0, settle_s=1.0,
                 grace_s=10.0, env=None):
        self.spec = spec
        self.device = 'cuda' if str(device).startswith('cuda') else 'cpu'
        self.argv = command(spec, self.device)
        self.ready_timeout_s = ready_timeout_s
        self.settle_s = settle_s
        self.grace_s = grace_s
        self.env = env
        self.proc = None
        self.log_path = None
        self._stopping = False
        self._report = {'name': spec, 'command': self.argv, 'pid': None, 'status': 'not started'}

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self):
        """Start the process and wait until it is ready; CoRunnerError (process gone) if not."""
        fd, self.log_path = tempfile.mkstemp(prefix='corunner-', suffix='.log')
        try:
            self.proc = subprocess.Popen(
                _launcher(self.argv), stdin=subprocess.DEVNULL, stdout=fd,
                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        except OSError as exc:
            os.close(fd)
            self._fail(f'cannot start {self.argv[0]!r}: {exc.strerror or exc}')
        os.close(fd)
        self._report.update(pid=self.proc.pid, status='starting')
        t0 = time.monotonic()
        builtin = self.spec in BUILTIN
        deadline = t0 + (self.ready_timeout_s if builtin else self.settle_s)
        while True:
            code = self.proc.poll()
            if code is not None:
                self._fail(f'exited with code {code} before it was ready{self._tail_text()}')
            if builtin and READY in self._log():
                break
            if time.monotonic() >= deadline:
                if builtin:
                    self._kill()
                    self._fail(f'not ready after {self.ready_timeout_s:g} s{self._tail_text()}')
                break  # a command alive for settle_s counts as running
            time.sleep(0.01)
        self._report.update(status='running', ready_s=time.monotonic() - t0)
        return self

    def stop(self):
        """End the process (SIGTERM, then SIGKILL) and return report(). Safe to call twice."""
        if self.proc is None or self._stopping:
            return self.report()
        self._stopping = True
        code = self.proc.poll()
        if code is not None:  # it ended on its own while the steps ran
            self._report.update(status='died', exit_code=code,
                                reason=f'exited with code {code} while the steps '
                                f'ran{self._tail_text()}')
        else:
            self._signal(signal.SIGTERM)
            try:
                code = self.proc.wait(self.grace_s)
                self._report['stopped_by'] = 'SIGTERM'
            except subprocess.TimeoutExpired:
                self._kill()
                code = self.proc.returncode
                self._report['stopped_by'] = 'SIGKILL'
            self._report.update(status='ran', exit_code=code)
        self._signal(signal.SIGKILL)  # anything it left in its group
        result = self._result()
        if result:
            self._report.update(result)
        self._report['log_tail'] = self._tail()
        self._cleanup()
        return self.report()

    def report(self):
        return dict(self._report)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- helpers ----------------------------------------------------------------------------
    def _fail(self, reason):
        self._report.update(status='failed', reason=reason, log_tail=self._tail())
        if self.proc is not None and self.proc.poll() is not None:
            self._report['exit_code'] = self.proc.returncode
        self._signal(signal.SIGKILL)
        self._cleanup()
        self._stopping = True
        raise CoRunnerError(f'co-runner {self.spec!r}: {reason}')

    def _signal(self, sig):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill(self):
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def _log(self):
        if not self.log_path:
            return ''
        try:
            with open(self.log_path, encoding='utf-8', errors='replace') as f:
                return f.read()
        except OSError:
            return ''

    def _tail(self, lines=5):
        text = [ln for ln in self._log().splitlines() if not ln.startswith('@@corunner')]
        return '\n'.join(text[-lines:])[-1000:]

    def _tail_text(self):
        tail = self._tail(2)
        return f': {tail}' if tail else ''

    def _result(self):
        for line in reversed(self._log().splitlines()):
            if line.startswith(RESULT):
                try:
                    return json.loads(line[len(RESULT):])
                except json.JSONDecodeError:
                    return None
        return None

    def _cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            self._kill()
        elif self.proc is not None:
            self.proc.wait()  # reaped: the pid is gone
        if self.log_path:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
            self.log_path = None


# -- the built-in loops (the co-runner process) -----------------------------------------------
def _work(kind, device):
    """-> (one unit of work, its amount, the unit of the rate)."""
    import torch
    torch.manual_seed(0)
    cuda = device == 'cuda'
    if kind in ('copy', 'idle'):
        src = torch.rand((2**28 if cuda else 2**24), device=device)  # 1 GiB / 64 MiB of fp32
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), 2 * src.numel() * 4 / 1e9, 'GB/s (read + write)'
    if kind == 'matmul':
        n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        return (lambda: torch.mm(a, b, out=c)), 2 * n**3 / 1e12, 'TFLOP/s'
    raise SystemExit(f'corunner: kind must be one of {", ".join(BUILTIN)}, not {kind!r}')


def _exec(argv):
    """Become the command (same pid), set to die with the parent."""
    _die_with_parent()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f'corunner: cannot run {argv[0]!r}: {exc.strerror or exc}', flush=True)
        return 127


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == 'exec':
        return _exec(argv[1:])
    if len(argv) != 2 or argv[1] not in ('cuda', 'cpu'):
        raise SystemExit('usage: python -m decode_monitor.bench.corunner '
                         f'{"|".join(BUILTIN)} cuda|cpu  |  exec COMMAND [ARG...]')
    _die_with_parent()
    kind, device = argv
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    import torch
    if device == 'cpu':
        torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    parent = os.getppid()
    work, amount, unit = _work(kind, device)
    work()
    sync()
    print(READY, flush=True)
    iterations, t0 = 0, time.perf_counter()
    while not stop and os.getppid() == parent:
        if kind == 'idle':
            time.sleep(0.05)
            continue
        for _ in range(4):
            work()
        sync()
        iterations += 4
    seconds = time.perf_counter() - t0
    rate = iterations * amount / seconds if kind != 'idle' and seconds > 0 else None
    print(RESULT + json.dumps({'kind': kind, 'device': device, 'iterations': iterations,
                               'seconds': seconds, 'rate': rate,
                               'unit': None if kind == 'idle' else unit}), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
