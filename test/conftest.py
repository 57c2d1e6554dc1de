import os
import random

import pytest
import torch

# Keep test traffic on this machine and away from any other ROS graph running beside it.
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
# A domain drawn here unless one is set; pytest-xdist's workers inherit the controller's draw
# and each takes its own domain beside it, so two workers' nodes never meet.
if 'ROS_DOMAIN_ID' not in os.environ:
    os.environ['ROS_DOMAIN_ID'] = str(random.Random(os.getpid()).randint(100, 190))
    os.environ['TEST_ROS_DOMAIN_DRAWN'] = '1'
_worker = os.environ.get('PYTEST_XDIST_WORKER', '')
if _worker.startswith('gw') and os.environ.get('TEST_ROS_DOMAIN_DRAWN') == '1':
    os.environ['ROS_DOMAIN_ID'] = str(int(os.environ['ROS_DOMAIN_ID']) + 1 + int(_worker[2:]))
    os.environ['TEST_ROS_DOMAIN_DRAWN'] = 'worker'
# Without a GPU, Triton kernels run in Triton's interpreter. That must be chosen before triton is
# first imported (importing transformers' model classes imports it), so here, not in a test.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU; skipped without one '
                            '(run them with -m gpu on a GPU machine)')


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope='session')
def smollm2():
    """The real embedded SmolLM2-135M-Instruct, loaded once (about 20 s on a CPU)."""
    from decode_monitor.engine.sources import load_model
    return load_model()


@pytest.fixture(scope='session')
def tiny():
    import torch
    from decode_monitor.engine.sources import load_model
    return load_model('tiny', dtype=torch.float32)
