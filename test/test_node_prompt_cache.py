"""Prompt caching through the node (its own process, real rclpy topics, SmolLM2 on the CPU).

A long system prompt (about 1500 tokens) sent twice: the second answer is the same text, from a
prompt almost all cached, and its first token comes at least five times sooner. The prefill of
1500 tokens against the prefill of one keeps that ratio far from its bound even on a loaded
machine. The node's own standing instructions (`system_prompt`) are cached from start-up on.
"""
import signal
import uuid

import pytest
import yaml

rclpy = pytest.importorskip('rclpy')
from ros_helpers import Client, start_node, stop_node  # noqa: E402

NS = '/prompt_cache'
OBJECTS = ('pallet', 'forklift', 'charging dock', 'conveyor', 'shelf', 'door', 'ramp', 'crate',
           'person', 'spill')
PLACES = ('loading bay', 'aisle', 'north wall', 'packing station', 'cold room', 'office', 'exit',
          'stairs')


def rules(count, verb):
    """Standing instructions of about 35 tokens a rule."""
    return ' '.join(f'Rule {i}: if a {OBJECTS[i % 10]} is near the {PLACES[i % 8]}, {verb} to '
                    f'{i % 5 + 1} tenths of a metre per second, say so, and wait for the '
                    'operator.' for i in range(1, count + 1))


STANDING = 'You are a warehouse robot. ' + rules(40, 'slow')


@pytest.fixture(scope='module')
def client(tmp_path_factory):
    params = tmp_path_factory.mktemp('params') / 'params.yaml'
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': {'system_prompt': STANDING}}}))
    node = start_node(NS, 'model:=smollm2', 'max_context:=2048', 'max_new_tokens_cap:=48',
                      'default_max_new_tokens:=8', params_file=str(params))
    rclpy.init()
    client = Client(NS)
    client.wait_ready(timeout=400)
    yield client
    client.destroy_node()
    rclpy.try_shutdown()
    out = stop_node(node, signal.SIGINT)
    assert node.returncode == 0, out


def ask(client, **body):
    return client.responses_for([client.send(body.pop('prompt', None), **body)], timeout=300)[0]


def test_the_same_long_system_prompt_is_answered_again_from_the_cache(client):
    system = f'Session {uuid.uuid4().hex}. You are a delivery robot. ' + rules(44, 'drive')
    messages = [{'role': 'system', 'content': system},
                {'role': 'user', 'content': 'What do you do near the cold room?'}]
    first = ask(client, messages=messages)
    second = ask(client, messages=messages)
    assert first['status'] == second['status'] == 'done', (first, second)
    assert first['prompt_tokens'] == second['prompt_tokens'] > 1400
    assert first['cached_prompt_tokens'] < 0.1 * first['prompt_tokens']  # a fresh prompt
    assert second['text'] == first['text'] and second['tokens'] == first['tokens'] > 0
    assert second['cached_prompt_tokens'] >= 0.9 * second['prompt_tokens']
    assert second['ttft_ms'] <= first['ttft_ms'] / 5, (first['ttft_ms'], second['ttft_ms'])


def test_the_standing_instructions_are_cached_from_start_up(client):
    question = 'What do you do near a spill?'
    first = ask(client, prompt=question)
    assert first['status'] == 'done', first
    assert first['prompt_tokens'] > 1200
    assert first['cached_prompt_tokens'] >= 0.9 * first['prompt_tokens']
    # a prompt without them writes its K/V where theirs were; they come back from the pinned copy
    other = ask(client, prompt='Once upon a time there was a robot. ' * 20, chat=False)
    assert other['status'] == 'done' and other['cached_prompt_tokens'] == 0, other
    again = ask(client, prompt=question)
    assert again['text'] == first['text']
    assert again['cached_prompt_tokens'] == first['cached_prompt_tokens']
