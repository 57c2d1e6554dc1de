"""The request/response wire format: plain text or JSON on std_msgs/String.

Every problem with a request becomes a RequestError with a message a person can act on; the
service turns it into exactly one terminal response carrying the request's id.
"""
from dataclasses import dataclass, field
import itertools
import json
import math
import re
import secrets

FIELDS = ('id', 'prompt', 'messages', 'max_new_tokens', 'temperature', 'top_p', 'top_k', 'seed',
          'stop', 'chat')
_ID_IN_BROKEN_JSON = re.compile(r'"id"\s*:\s*"([^"\\]{1,128})"')


class RequestError(ValueError):
    def __init__(self, message, request_id=None):
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class Limits:
    default_max_new_tokens: int = 128
    max_new_tokens: int = 1024
    max_request_bytes: int = 1 << 20
    max_stop_strings: int = 8
    max_id_chars: int = 128


@dataclass
class Request:
    id: str
    prompt: str = None
    messages: list = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list = field(default_factory=list)
    chat: bool = None  # None: use the model's chat template when it has one


class RequestIds:
    """Ids for requests that come without one: `<prefix>-<n>`, the prefix random per start.

    A client that numbers its own requests (`req-1`, `7`, ...) cannot meet these, and ids from
    before a restart are not handed out again. `taken(id)` lets the caller skip an id that is
    still pending all the same.
    """

    def __init__(self, prefix=None, taken=None):
        self.prefix = prefix or f'node-{secrets.token_hex(4)}'
        self._count = itertools.count(1)
        self._taken = taken or (lambda request_id: False)

    def __call__(self):
        while True:
            request_id = f'{self.prefix}-{next(self._count)}'
            if not self._taken(request_id):
                return request_id


def parse_request(raw, limits=Limits(), new_id=None):
    """Parse a request message; raises RequestError (with the id when it can be recovered).

    new_id() names a request that has no id of its own (a RequestIds by default).
    """
    new_id = new_id or RequestIds()
    if not isinstance(raw, str):
        raise RequestError(f'request must be text, got {type(raw).__name__}', new_id())
    size = len(raw.encode('utf-8', errors='surrogatepass'))
    if size > limits.max_request_bytes:
        raise RequestError(f'request is {size} bytes, over the limit of '
                           f'{limits.max_request_bytes}', new_id())
    text = raw.strip()
    if not text.startswith('{'):
        if not text:
            raise RequestError('empty prompt', new_id())
        return Request(new_id(), prompt=raw, max_new_tokens=limits.default_max_new_tokens)
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        match = _ID_IN_BROKEN_JSON.search(text)
        raise RequestError(f'malformed JSON: {exc}', match.group(1) if match else new_id())
    return _from_object(body, limits, new_id)


def _reject_constant(name):
    raise ValueError(f'{name} is not a valid JSON number')


def _from_object(body, limits, new_id):
    request_id = _parse_id(body.get('id'), limits, new_id)
    unknown = sorted(str(k) for k in body if k not in FIELDS)
    if unknown:
        raise RequestError(f'unknown field(s) {", ".join(map(repr, unknown))}; known: '
                           f'{", ".join(FIELDS)}', request_id)
    try:
        return Request(
            id=request_id,
            prompt=_prompt(body),
            messages=_messages(body),
            max_new_tokens=_integer(body, 'max_new_tokens', limits.default_max_new_tokens,
                                    1, limits.max_new_tokens),
            temperature=_number(body, 'temperature', 0.0, 0.0, 10.0),
            top_p=_number(body, 'top_p', 1.0, 0.0, 1.0, low_open=True),
            top_k=_integer(body, 'top_k', 0, 0, 1 << 20),
            seed=_integer(body, 'seed', 0, 0, (1 << 62)),
            stop=_stop(body, limits),
            chat=_boolean(body, 'chat'),
        )
    except RequestError as exc:
        exc.request_id = request_id
        raise


def _parse_id(value, limits, new_id):
    if value is None:
        return new_id()
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(f'"id" must be a string or an integer, got {type(value).__name__}',
                           new_id())
    value = str(value)
    if not value or len(value) > limits.max_id_chars:
        raise RequestError(f'"id" must have 1 to {limits.max_id_chars} characters', new_id())
    return value


def _prompt(body):
    prompt = body.get('prompt')
    has_messages = body.get('messages') is not None
    if prompt is None:
        if not has_messages:
            raise RequestError('the request needs "prompt" or "messages"')
        return None
    if has_messages:
        raise RequestError('give "prompt" or "messages", not both')
    if not isinstance(prompt, str):
        raise RequestError(f'"prompt" must be a string, got {type(prompt).__name__}')
    if not prompt.strip():
        raise RequestError('empty prompt')
    return prompt


def _messages(body):
    messages = body.get('messages')
    if messages is None:
        return None
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list of {"role", "content"} objects')
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or set(message) != {'role', 'content'}
                or not all(isinstance(message[k], str) for k in ('role', 'content'))):
            raise RequestError(f'messages[{i}] must be an object with string "role" and '
                               '"content" and nothing else')
        if message['role'] not in ('system', 'user', 'assistant'):
            raise RequestError(f'messages[{i}].role must be system, user or assistant')
    if not any(m['content'].strip() for m in messages):
        raise RequestError('empty prompt: every message is blank')
    return messages


def _integer(body, key, default, low, high):
    value = body.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f'"{key}" must be an integer, got {type(value).__name__}')
    if not low <= value <= high:
        raise RequestError(f'"{key}" must be between {low} and {high}, got {value}')
    return value


def _number(body, key, default, low, high, low_open=False):
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f'"{key}" must be a number, got {type(value).__name__}')
    value = float(value)
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bound = '(' if low_open else '['
        raise RequestError(f'"{key}" must be in {bound}{low}, {high}], got {value}')
    return value


def _boolean(body, key):
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f'"{key}" must be true or false, got {type(value).__name__}')
    return value


def _stop(body, limits):
    stop = body.get('stop', [])
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > limits.max_stop_strings
            or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f'"stop" must be a string or a list of at most '
                           f'{limits.max_stop_strings} non-empty strings')
    return stop


def response(request_id, status, text='', error=None, **fields):
    """One terminal response as a JSON string; status is done, error or cancelled."""
    body = {'id': request_id, 'status': status, 'text': text, 'error': error}
    body.update(fields)
    return json.dumps(body, ensure_ascii=False)
