from decode_monitor.serving.text import TextStream


def feed(tokenizer, text, stop=()):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stop)
    chunks = []
    for i in ids:
        chunks.append(stream.push(i))
        if stream.stopped:
            break
    chunks.append(stream.flush())
    return chunks, stream


def test_streamed_chunks_add_up_to_the_decoded_text(smollm2):
    text = 'Robots need maps, sensors and 電池 (batteries) 🔋 to move.'
    chunks, stream = feed(smollm2.tokenizer, text)
    assert ''.join(chunks) == text == stream.text
    assert all('\ufffd' not in c for c in chunks)  # no half characters ever published


def test_stop_string_cuts_the_text_and_is_never_published(smollm2):
    chunks, stream = feed(smollm2.tokenizer, 'one, two, three, four, five', stop=[', four'])
    assert stream.stopped
    assert ''.join(chunks) == 'one, two, three' == stream.text
