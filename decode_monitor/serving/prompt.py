"""A request's prompt as token ids: through the model's chat template when it has one."""


def encode_prompt(tokenizer, request):
    """Token ids for a request: the chat template for messages (or a plain prompt, by default,
    when the model has a template), else the raw text."""
    has_template = bool(getattr(tokenizer, 'chat_template', None))
    use_chat = request.chat if request.chat is not None else has_template
    messages = request.messages
    if messages is None and use_chat and has_template:
        messages = [{'role': 'user', 'content': request.prompt}]
    if messages is not None:
        if not has_template:
            raise ValueError('the model has no chat template; send "prompt" instead')
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return list(tokenizer.encode(request.prompt, add_special_tokens=False))
