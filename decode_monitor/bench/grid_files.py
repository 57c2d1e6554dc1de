"""Grid files: where the named grids are found, and reading one into a mapping.

The named grids ship as `config/*.yaml`: found in the source tree first (a checkout), then in the
installed share directory of this prefix and of every ament prefix (a ROS install), looked up
when asked, never at import.
"""
import os
import sys

import yaml

from decode_monitor.bench.grid_values import GridError

NAMED_GRIDS = {'study': 'bench.yaml', 'quick': 'bench_quick.yaml'}


def default_config_dirs():
    """Where named grids are looked for: the source tree, then the installed share directory."""
    here = os.path.dirname(os.path.abspath(__file__))
    dirs = [os.path.normpath(os.path.join(here, '..', '..', 'config'))]
    dirs.append(os.path.join(sys.prefix, 'share', 'decode_monitor', 'config'))
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if prefix:
            dirs.append(os.path.join(prefix, 'share', 'decode_monitor', 'config'))
    return dirs


def locate(name_or_path):
    """'study' / 'quick' -> the installed YAML; anything else is a path."""
    if name_or_path in NAMED_GRIDS:
        filename = NAMED_GRIDS[name_or_path]
        for directory in default_config_dirs():
            path = os.path.join(directory, filename)
            if os.path.isfile(path):
                return path
        raise GridError(f'grid {name_or_path!r}: {filename} not found in '
                        + ', '.join(default_config_dirs()))
    if not os.path.isfile(name_or_path):
        raise GridError(f'grid file {name_or_path!r} does not exist '
                        f'(named grids: {", ".join(NAMED_GRIDS)})')
    return name_or_path


def read_mapping(path):
    """The parsed YAML of a grid file; an invalid or empty file is a GridError naming it."""
    try:
        with open(path, encoding='utf-8') as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise GridError(f'{path}: not valid YAML: {exc}') from None
    if raw is None:
        raise GridError(f'{path}: the file is empty')
    return raw
