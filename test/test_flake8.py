"""Style as ament_flake8 checks it (line length 99), with plain flake8 where ament is absent."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), '..')


def test_flake8():
    run = subprocess.run([sys.executable, '-m', 'flake8', '--max-line-length', '99',
                          'decode_monitor', 'test', 'launch', 'setup.py'],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
