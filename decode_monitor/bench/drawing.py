"""What every bench picture shares: matplotlib on the Agg backend (files only, no display),
saving a figure, and confidence intervals drawn as error bars.

The report's plots (plots.py) and the study's figures (figures*.py) draw through this module, so
the backend is chosen in one place and every PNG is written the same way.
"""
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

__all__ = ['error_bars', 'plt', 'save']


def save(fig, out_dir, name):
    """Write `fig` as out_dir/name (the directory made if need be), close it; -> the path."""
    os.makedirs(out_dir, exist_ok=True)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def error_bars(ests):
    """matplotlib's yerr of stats Estimates: [below, above] their values (0 without a CI)."""
    lo = [max(e.value - e.lo, 0.0) if e.has_ci else 0.0 for e in ests]
    hi = [max(e.hi - e.value, 0.0) if e.has_ci else 0.0 for e in ests]
    return [lo, hi]
