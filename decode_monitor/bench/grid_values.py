"""Checkers of one grid value: each returns the clean value or raises GridError naming the key.

Shared by the grid file's keys and the command line's overrides, so that both say the same thing
about the same mistake ("contexts[2]: expected a positive integer, got 'x'").
"""


class GridError(ValueError):
    """A grid file or override is invalid; the message names the key."""


def fail(key, expected, value):
    raise GridError(f'{key}: expected {expected}, got {value!r}')


def pos_int(key, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(key, 'a positive integer' if minimum == 1 else f'an integer >= {minimum}', value)
    return value


def number(key, value, minimum=0.0, allow_none=False, exclusive=False):
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < minimum or (exclusive and value == minimum):
        what = f'a number {">" if exclusive else ">="} {minimum}'
        fail(key, what + (' or null' if allow_none else ''), value)
    return float(value)


def choice(key, value, choices):
    if value not in choices:
        fail(key, 'one of ' + ', '.join(choices), value)
    return value


def nonempty_list(key, value):
    if isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        fail(key, 'a non-empty list', value)
    if len(set(map(str, value))) != len(value):
        fail(key, 'a list without duplicates', value)
    return list(value)
