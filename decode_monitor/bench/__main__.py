"""python -m decode_monitor.bench ... (the same as the `bench` console script)."""
import sys

from decode_monitor.bench.cli import main

sys.exit(main())
