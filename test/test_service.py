"""The decode service with a real (tiny, random-weight) decoder: one terminal response each."""
import json
import threading
import time

import pytest

from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.sources import load_model, ModelLoadError
from decode_monitor.serving.protocol import Limits


class Harness:
    def __init__(self, tiny, queue_size=4, gate=None, fail=None, **kwargs):
        from decode_monitor.serving.service import DecodeService
        self.stream, self.responses = [], []
        self.cancel_on_chunk = None

        def load():
            if gate is not None:
                gate.wait(30)
            if fail:
                return Decoder(load_model(fail), mode='eager')
            return Decoder(tiny, mode='eager', max_context=256)

        def on_stream(request_id, index, text):
            self.stream.append((request_id, index, text))
            if self.cancel_on_chunk == request_id:
                self.service.cancel(request_id)
        self.service = DecodeService(load, on_stream,
                                     lambda body: self.responses.append(json.loads(body)),
                                     limits=Limits(default_max_new_tokens=8, max_new_tokens=200),
                                     queue_size=queue_size, **kwargs)
        self.service.start()

    def wait(self, count, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.responses) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # nothing more may arrive
        return {r['id']: r for r in self.responses}


def test_each_request_gets_exactly_one_response(tiny):
    h = Harness(tiny)
    raws = ['{"id": "a", "prompt": "hi"}', '{"id": "b", "prompt": 3}', 'plain text',
            '{"id": "c", "prompt": "x", "max_new_tokens": 500}', '{broken',
            json.dumps({'id': 'd', 'prompt': 'x' * 100, 'max_new_tokens': 199})]
    for raw in raws:
        h.service.submit(raw)
    by_id = h.wait(len(raws))
    assert len(h.responses) == len(raws) == len(by_id)
    assert by_id['a']['status'] == 'done' and by_id['a']['tokens'] == 8
    assert ''.join(t for i, _, t in h.stream if i == 'a') == by_id['a']['text']
    assert 'must be a string' in by_id['b']['error']
    assert 'between 1 and 200' in by_id['c']['error']
    assert 'exceeds max_context 256' in by_id['d']['error']  # 100 + 199 > 256
    c = h.service.snapshot()['counters']
    assert (c.received, c.served, c.rejected, c.errors) == (6, 2, 3, 1)
    h.service.stop()


def test_queue_full_duplicate_and_cancel_while_queued(tiny):
    gate = threading.Event()  # the model is still loading: requests wait in the queue
    h = Harness(tiny, queue_size=2, gate=gate)
    for name in 'abcd':
        h.service.submit(json.dumps({'id': name, 'prompt': 'x'}))
    h.service.submit(json.dumps({'id': 'a', 'prompt': 'again'}))
    h.service.cancel('b')
    h.service.cancel('nobody')
    early = h.wait(5, timeout=5)
    assert 'queue full' in early['c']['error'] and 'queue full' in early['d']['error']
    assert early['b']['status'] == 'cancelled'
    assert early['nobody']['cancel'] is True and 'no queued' in early['nobody']['error']
    assert 'duplicate id' in [r for r in h.responses if r['id'] == 'a'][0]['error']
    gate.set()
    final = h.wait(6)
    assert final['a']['status'] == 'done'
    h.service.cancel('a')
    assert 'already finished' in h.wait(7)['a']['error']
    h.service.stop()


def test_cancel_mid_stream_keeps_the_partial_text(tiny):
    h = Harness(tiny)
    h.cancel_on_chunk = 'long'
    h.service.submit(json.dumps({'id': 'long', 'prompt': 'x', 'max_new_tokens': 200}))
    h.service.submit(json.dumps({'id': 'next', 'prompt': 'y'}))
    by_id = h.wait(2)
    assert by_id['long']['status'] == 'cancelled'
    assert 0 < by_id['long']['tokens'] < 200
    assert by_id['next']['status'] == 'done'
    h.service.stop()


def test_timeout_ends_a_request_with_an_error(tiny):
    h = Harness(tiny, request_timeout_s=0.05)
    h.service.submit(json.dumps({'id': 't', 'prompt': 'x', 'max_new_tokens': 200}))
    body = h.wait(1)['t']
    assert body['status'] == 'error' and 'timed out' in body['error']
    h.service.stop()


def test_load_failure_keeps_answering_with_the_reason(tiny, tmp_path):
    h = Harness(tiny, fail=str(tmp_path / 'missing-model'))
    h.service.submit('hello')
    body = h.wait(1)
    body = next(iter(body.values()))
    snapshot = h.service.snapshot()
    assert snapshot['state'] == 'failed' and 'ModelLoadError' in snapshot['load_error']
    assert body['status'] == 'error' and 'model not loaded' in body['error']
    h.service.stop()


def test_corrupt_model_file_is_a_load_error(tmp_path):
    bad = tmp_path / 'broken.gguf'
    bad.write_bytes(b'GGUF' + b'\x00' * 64)
    with pytest.raises(ModelLoadError):
        load_model(str(bad))


def test_stop_answers_everything_still_queued(tiny):
    gate = threading.Event()
    h = Harness(tiny, gate=gate)
    h.service.submit('one')
    h.service.submit('two')
    stopper = threading.Thread(target=h.service.stop)
    stopper.start()
    gate.set()
    stopper.join(30)
    assert sorted(r['status'] for r in h.responses) == ['cancelled', 'cancelled']
