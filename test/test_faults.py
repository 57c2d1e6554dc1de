"""Faults injected through the backend seam: the service answers and keeps serving."""
import json
import re
import time
from pathlib import Path

import torch

from decode_monitor.engine.decoder import BACKENDS, Decoder
from decode_monitor.engine.hf_backend import HFBackend
from decode_monitor.serving.service import DecodeService


class OutOfMemoryOnce(HFBackend):
    """The real hf backend, except that its third decode step runs out of memory, once."""

    name = 'hf-oom-once'
    calls = 0

    def forward_one(self, token, pos):
        OutOfMemoryOnce.calls += 1
        if OutOfMemoryOnce.calls == 3:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return super().forward_one(token, pos)


def test_out_of_memory_in_a_step_is_an_error_then_the_next_request_is_served(tiny, monkeypatch):
    monkeypatch.setitem(BACKENDS, 'hf-oom-once', OutOfMemoryOnce)  # for this test only
    responses, streamed = [], {}

    def on_stream(request_id, index, text):
        streamed[request_id] = streamed.get(request_id, '') + text
    service = DecodeService(lambda: Decoder(tiny, mode='eager', backend='hf-oom-once',
                                            max_context=128),
                            on_stream, lambda body: responses.append(json.loads(body)))
    service.start()
    # the stop string '>!' holds back each step's last '>' (the tiny preset's tokens read
    # `<id>`): the failed request's held-back tail must be streamed too
    service.submit(json.dumps({'id': 'first', 'prompt': 'x', 'max_new_tokens': 8,
                               'stop': ['>!']}))
    service.submit(json.dumps({'id': 'second', 'prompt': 'y', 'max_new_tokens': 8}))
    deadline = time.monotonic() + 60
    while len(responses) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    service.stop()
    first, second = responses
    assert first['id'] == 'first' and first['status'] == 'error'
    # prefill's token and two steps' made it out before the third step failed
    assert 'OutOfMemoryError' in first['error'] and first['tokens'] == 3
    assert second['id'] == 'second' and second['status'] == 'done' and second['tokens'] == 8
    assert first['text'].endswith('>') and streamed['first'] == first['text']
    assert streamed['second'] == second['text']
    assert service.snapshot()['counters'].errors == 1


def test_no_eval_exec_pickle_or_unsafe_load_in_the_package():
    root = Path(__file__).resolve().parent.parent / 'decode_monitor'
    for path in root.rglob('*.py'):
        source = path.read_text()
        assert not re.search(r'(?<![.\w])(eval|exec)\(', source), path  # not module.eval()
        assert not re.search(r'\bimport pickle|\bpickle\.', source), path
        assert 'shell=True' not in source, path
        for call in re.findall(r'torch\.load\([^)]*\)', source):
            assert 'weights_only=True' in call, (path, call)
