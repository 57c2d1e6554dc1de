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
        self.stream, self.responses, self.errors = [], [], []
        self.cancel_on_chunk = None
        self.on_chunk = None
        self.fail_responses = set()

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
            if self.on_chunk is not None:
                self.on_chunk(request_id)

        def on_response(body):
            body = json.loads(body)
            if body['id'] in self.fail_responses:
                raise RuntimeError("publisher's context is invalid")
            # what a subscriber had been streamed when the response came
            body['streamed before'] = ''.join(t for i, _, t in self.stream if i == body['id'])
            self.responses.append(body)
        self.service = DecodeService(load, on_stream, on_response,
                                     limits=Limits(default_max_new_tokens=8, max_new_tokens=200),
                                     queue_size=queue_size, log_error=self.errors.append,
                                     **kwargs)
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
    assert by_id['a']['streamed before'] == by_id['a']['text']  # every chunk, then the end
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


def test_held_back_text_is_streamed_before_the_response(tiny):
    """Text that could begin a stop string is held back until the request ends; that tail is
    still streamed, and before the response, so a client that stops at the response (`ask`)
    has all of it. The tiny preset's tokens read `<id>`: with the stop string '>!' every
    step's last '>' is held back, and the end of the request flushes it."""
    h = Harness(tiny)
    h.cancel_on_chunk = 'cancelled'
    for request_id, tokens in (('done', 6), ('cancelled', 200)):
        h.service.submit(json.dumps({'id': request_id, 'prompt': 'x', 'stop': ['>!'],
                                     'max_new_tokens': tokens}))
    by_id = h.wait(2)
    assert by_id['done']['status'] == 'done' and by_id['done']['finish_reason'] == 'length'
    assert by_id['cancelled']['status'] == 'cancelled' and by_id['cancelled']['tokens'] < 200
    for body in by_id.values():
        assert body['text'].endswith('>')  # the tail was held back to the end...
        assert body['streamed before'] == body['text']  # ...and streamed before the answer
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


def test_shutdown_answers_everything_still_queued(tiny):
    gate = threading.Event()
    h = Harness(tiny, gate=gate)
    h.service.submit('one')
    h.service.submit('two')
    stopper = threading.Thread(target=h.service.shutdown)
    stopper.start()
    gate.set()
    stopper.join(30)
    assert [(r['status'], r['error']) for r in h.responses] == [
        ('error', 'the node is shutting down')] * 2
    assert len({r['id'] for r in h.responses}) == 2
    h.service.submit('three')  # after shutdown: refused, still answered
    assert h.responses[-1]['error'] == 'the node is shutting down'


def test_shutdown_mid_decode_answers_the_running_and_queued_once(tiny):
    h = Harness(tiny, queue_size=8)
    started = threading.Event()
    h.on_chunk = lambda request_id: started.set()
    h.service.submit(json.dumps({'id': 'running', 'prompt': 'x', 'max_new_tokens': 200}))
    for i in range(5):
        h.service.submit(json.dumps({'id': f'queued-{i}', 'prompt': 'x'}))
    assert started.wait(60), 'the first request never streamed'
    h.service.shutdown(timeout=30)
    time.sleep(0.2)  # a second answer, if any, would arrive now
    ids = [r['id'] for r in h.responses]
    assert sorted(ids) == sorted(['running'] + [f'queued-{i}' for i in range(5)])
    running = next(r for r in h.responses if r['id'] == 'running')
    assert running['status'] == 'error' and running['error'] == 'the node is shutting down'
    assert 0 < running['tokens'] < 200
    assert running['streamed before'] == running['text']
    assert not h.service._thread.is_alive()


def test_a_failing_publish_is_counted_and_the_worker_keeps_serving(tiny):
    h = Harness(tiny)
    h.fail_responses = {'first'}  # the publisher raises, as rclpy does once its context is gone
    h.service.submit(json.dumps({'id': 'first', 'prompt': 'x'}))
    h.service.submit(json.dumps({'id': 'second', 'prompt': 'y'}))
    assert h.wait(1)['second']['status'] == 'done'
    snapshot = h.service.snapshot()
    assert snapshot['counters'].publish_failures == 1 and snapshot['worker_error'] is None
    assert h.errors and 'publish failed' in h.errors[0]
    h.service.shutdown()


def test_node_assigned_ids_skip_pending_client_ids(tiny):
    gate = threading.Event()
    h = Harness(tiny, gate=gate)
    prefix = h.service.ids.prefix
    h.service.submit(json.dumps({'id': f'{prefix}-1', 'prompt': 'x'}))  # a client took it
    h.service.submit('plain text')
    gate.set()
    by_id = h.wait(2)
    assert by_id[f'{prefix}-1']['status'] == 'done'
    assert by_id[f'{prefix}-2']['status'] == 'done'  # the plain one was not a duplicate
    other = type(h.service.ids)()
    assert other.prefix != prefix  # each start draws its own
    h.service.shutdown()


def test_lifecycle_states_refuse_with_the_state_named_and_lose_nothing(tiny):
    from decode_monitor.serving.service import DecodeService
    responses = []
    service = DecodeService(lambda: Decoder(tiny, mode='eager', max_context=256),
                            lambda *a: None, lambda b: responses.append(json.loads(b)),
                            limits=Limits(default_max_new_tokens=4))
    service.start(serve=False)
    service.submit('early')
    assert 'unconfigured' in responses[-1]['error']
    assert service.configure(wait=True, timeout=60) and service.state == 'inactive'
    service.submit('configured')
    assert 'inactive' in responses[-1]['error']
    service.activate()
    service.submit(json.dumps({'id': 'served', 'prompt': 'x'}))
    deadline = time.monotonic() + 60
    while len(responses) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert responses[-1]['id'] == 'served' and responses[-1]['status'] == 'done'
    service.deactivate('the node is inactive')
    service.submit('after')
    assert responses[-1]['error'] == 'the node is inactive'
    service.cleanup(wait=True, timeout=60)
    assert service.decoder is None and service.state == 'unconfigured'
    service.shutdown()
