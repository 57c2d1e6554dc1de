"""The launch file: executed where launch_ros exists, else parsed and cross-checked."""
import ast
import importlib.util
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), '..')
LAUNCH = os.path.join(ROOT, 'launch', 'llm_decoder.launch.py')


def _setup_py():
    with open(os.path.join(ROOT, 'setup.py')) as f:
        return f.read()


def test_launch_file_names_exist_in_setup_and_config():
    with open(LAUNCH) as f:
        tree = ast.parse(f.read())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    setup = _setup_py()
    assert 'llm_decoder' in strings and 'llm_decoder = decode_monitor.node' in setup
    assert 'decoder.yaml' in strings and os.path.isfile(os.path.join(ROOT, 'config',
                                                                     'decoder.yaml'))
    assert "glob('launch/*.launch.py')" in setup and "glob('config/*.yaml')" in setup
    declared = {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, 'id', '') == 'DeclareLaunchArgument'}
    assert declared == {'namespace', 'params_file', 'model', 'device', 'mode', 'backend',
                        'weights', 'mirror_diagnostics', 'autostart'}


def test_launch_arguments_become_parameter_overrides():
    from decode_monitor.node.launch_args import parameter_overrides
    from decode_monitor.node.parameters import PARAMETERS
    given = dict(model='qwen2.5-7b', device='', mode='eager', backend='', weights='int8',
                 mirror_diagnostics='True', autostart='false')
    overrides = parameter_overrides(given)
    assert overrides == dict(model='qwen2.5-7b', mode='eager', weights='int8',
                             mirror_diagnostics=True, autostart=False)
    assert set(overrides) <= set(PARAMETERS)  # every override names a real parameter
    for name, value in overrides.items():  # and has the parameter's type
        assert type(value) is type(PARAMETERS[name][0]), name
    assert parameter_overrides({}) == {}
    with pytest.raises(ValueError, match='autostart'):
        parameter_overrides(dict(autostart='maybe'))


@pytest.mark.skipif(importlib.util.find_spec('launch_ros') is None,
                    reason='launch_ros comes with a ROS 2 install, not from PyPI')
def test_launch_description_builds():
    spec = importlib.util.spec_from_file_location('llm_decoder_launch', LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.generate_launch_description().entities
