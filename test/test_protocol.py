import json

import pytest

from decode_monitor.serving.protocol import Limits, parse_request, RequestError, response

LIMITS = Limits(default_max_new_tokens=16, max_new_tokens=64, max_request_bytes=4096)


def test_plain_text_is_a_prompt_with_a_fresh_id():
    a, b = parse_request('hello robot', LIMITS), parse_request('hello again', LIMITS)
    assert a.prompt == 'hello robot' and a.max_new_tokens == 16
    assert a.id != b.id


def test_json_request_fields():
    r = parse_request(json.dumps({
        'id': 7, 'messages': [{'role': 'user', 'content': 'hi'}], 'max_new_tokens': 8,
        'temperature': 0.5, 'top_p': 0.9, 'top_k': 40, 'seed': 3, 'stop': 'END', 'chat': True}),
        LIMITS)
    assert (r.id, r.prompt, r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.seed, r.stop,
            r.chat) == ('7', None, 8, 0.5, 0.9, 40, 3, ['END'], True)


@pytest.mark.parametrize('raw, needle', [
    ('{"id": "a", "prompt": ', 'malformed JSON'),
    ('', 'empty prompt'),
    ('   \n', 'empty prompt'),
    ('{"id": "a", "prompt": "   "}', 'empty prompt'),
    ('{"id": "a"}', 'needs "prompt" or "messages"'),
    ('{"id": "a", "prompt": 5}', '"prompt" must be a string'),
    ('{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}', 'not both'),
    ('{"id": "a", "messages": []}', 'non-empty list'),
    ('{"id": "a", "messages": [{"role": "robot", "content": "y"}]}', 'role must be'),
    ('{"id": "a", "messages": [{"role": "user"}]}', 'messages[0]'),
    ('{"id": "a", "prompt": "x", "max_new_tokens": "ten"}', 'must be an integer'),
    ('{"id": "a", "prompt": "x", "max_new_tokens": 65}', 'between 1 and 64'),
    ('{"id": "a", "prompt": "x", "max_new_tokens": 0}', 'between 1 and 64'),
    ('{"id": "a", "prompt": "x", "max_new_tokens": true}', 'must be an integer'),
    ('{"id": "a", "prompt": "x", "temperature": -1}', 'temperature'),
    ('{"id": "a", "prompt": "x", "temperature": NaN}', 'not a valid JSON number'),
    ('{"id": "a", "prompt": "x", "top_p": 0}', 'top_p'),
    ('{"id": "a", "prompt": "x", "stop": [""]}', '"stop"'),
    ('{"id": "a", "prompt": "x", "chat": "yes"}', '"chat"'),
    ('{"id": "a", "prompt": "x", "max_tokens": 5}', "unknown field(s) 'max_tokens'"),
    ('{"id": {"x": 1}, "prompt": "x"}', '"id" must be a string'),
    ('{"prompt": "' + 'x' * 5000 + '"}', 'over the limit'),
])
def test_bad_requests_get_clear_errors(raw, needle):
    with pytest.raises(RequestError) as info:
        parse_request(raw, LIMITS)
    assert needle in str(info.value)
    assert info.value.request_id


def test_deep_nesting_is_malformed_not_a_crash():
    raw = '{"a": ' * 50000 + '1' + '}' * 50000
    with pytest.raises(RequestError) as info:
        parse_request(raw, Limits(max_request_bytes=1 << 20))
    assert 'malformed JSON' in str(info.value)


def test_only_text_starting_with_a_brace_is_json():
    assert parse_request('[1, 2] is a list', LIMITS).prompt == '[1, 2] is a list'


def test_errors_keep_the_callers_id_even_from_broken_json():
    for raw in ('{"id": "abc", "prompt": 5}', '{"id": "abc", "prompt": "x",'):
        with pytest.raises(RequestError) as info:
            parse_request(raw, LIMITS)
        assert info.value.request_id == 'abc'


def test_response_is_json_with_the_terminal_fields():
    body = json.loads(response('a', 'done', 'text', None, tokens=3))
    assert body == {'id': 'a', 'status': 'done', 'text': 'text', 'error': None, 'tokens': 3}
