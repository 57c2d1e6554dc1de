import subprocess
import sys
import os

import pytest

pytest.importorskip('rclpy')
from decode_monitor.node.parameters import PARAMETERS, ParameterError, validate  # noqa: E402


def defaults(**changes):
    values = {name: default for name, (default, _, _) in PARAMETERS.items()}
    values.update(changes)
    return values


def test_defaults_are_valid_and_match_the_shipped_yaml():
    import yaml
    config = validate(defaults())
    assert config.settings.mode == 'auto' and config.queue_size == 16 and config.autostart
    here = os.path.dirname(__file__)
    with open(os.path.join(here, '..', 'config', 'decoder.yaml')) as f:
        shipped = yaml.safe_load(f)['/**']['ros__parameters']
    assert shipped == defaults()


@pytest.mark.parametrize('changes, needle', [
    (dict(mode='fast'), 'mode'), (dict(dtype='int3'), 'dtype'), (dict(backend='x'), 'backend'),
    (dict(device='gpu'), 'device'), (dict(model=' '), 'model'),
    (dict(weights='fp8'), 'weights'), (dict(weights='int4', backend='hf'), 'weights'),
    (dict(weights='int8', backend='hf'), 'weights=.int8. needs backend fused or persistent'),
    (dict(default_max_new_tokens=2000), 'default_max_new_tokens'),
    (dict(max_new_tokens_cap=4096), 'max_new_tokens_cap'),
    (dict(kernel_configs='/no/such/table.json'), 'kernel_configs'),
])
def test_invalid_values_are_rejected_with_the_parameter_named(changes, needle):
    with pytest.raises(ParameterError, match=needle):
        validate(defaults(**changes))


def test_integers_are_accepted_for_doubles_and_ranges_hold_for_both():
    config = validate(defaults(latency_budget_ms=50, request_timeout_s=2))
    assert config.thresholds.latency_budget_ms == 50.0
    assert isinstance(config.request_timeout_s, float)
    with pytest.raises(ParameterError, match='min_floor_fraction'):
        validate(defaults(min_floor_fraction=2))  # an integer outside the double's range
    with pytest.raises(ParameterError, match='latency_budget_ms'):
        validate(defaults(latency_budget_ms='fast'))


def test_node_refuses_to_start_on_a_bad_parameter():
    exe = os.path.join(os.path.dirname(sys.executable), 'llm_decoder')
    for arg, needle in (('mode:=fast', 'mode'), ('queue_size:=0', 'queue_size')):
        run = subprocess.run([exe, '--ros-args', '-p', arg], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 2, run.stderr
        assert needle in run.stderr
