import os
import random

import pytest
import torch

# Keep test traffic on this machine and away from any other ROS graph running beside it.
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
# Under pytest-xdist the workers share a parent: one draw from it, a domain per worker.
_worker = os.environ.get('PYTEST_XDIST_WORKER', '')
_domain = (random.Random(os.getppid()).randint(100, 190) + int(_worker[2:])
           if _worker.startswith('gw') else random.Random(os.getpid()).randint(100, 200))
os.environ.setdefault('ROS_DOMAIN_ID', str(_domain))
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
