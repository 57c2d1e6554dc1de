"""A request's prompt as token ids: through the model's chat template when it has one.

A node-wide system prompt (the robot's standing instructions) opens every chat request that
does not bring its own system message. Its tokens, up to where the requests' own text begins
(`standing_prefix`), are the prefix the decoder pins in its KV cache at start-up.
"""


def _messages(tokenizer, request, system_prompt=''):
    """The chat messages of a request, or None for raw text."""
    has_template = bool(getattr(tokenizer, 'chat_template', None))
    use_chat = request.chat if request.chat is not None else has_template
    messages = request.messages
    if messages is None and use_chat and has_template:
        messages = [{'role': 'user', 'content': request.prompt}]
    if messages is not None and not has_template:
        raise ValueError('the model has no chat template; send "prompt" instead')
    if messages is not None and system_prompt and not any(
            m['role'] == 'system' for m in messages):
        messages = [{'role': 'system', 'content': system_prompt}] + list(messages)
    return messages


def _chat_ids(tokenizer, messages):
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def encode_prompt(tokenizer, request, system_prompt=''):
    """Token ids for a request: the chat template for messages (or a plain prompt, by default,
    when the model has a template), else the raw text. `system_prompt` opens a chat that has no
    system message of its own (a request's own one replaces it)."""
    messages = _messages(tokenizer, request, system_prompt)
    if messages is not None:
        return _chat_ids(tokenizer, messages)
    return list(tokenizer.encode(request.prompt, add_special_tokens=False))


def standing_prefix(tokenizer, system_prompt):
    """The token ids every chat request opened by `system_prompt` starts with: the common
    prefix of two chats that differ from their first user character on (a template may
    tokenise across the boundary, so the template alone is not trusted to be a prefix)."""
    if not getattr(tokenizer, 'chat_template', None):
        raise ValueError('system_prompt needs a model with a chat template')
    a, b = (_chat_ids(tokenizer, [{'role': 'system', 'content': system_prompt},
                                  {'role': 'user', 'content': text}]) for text in ('A', '7'))
    same = 0
    while same < min(len(a), len(b)) and a[same] == b[same]:
        same += 1
    return a[:same]
