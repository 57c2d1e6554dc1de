"""Turning generated token ids into streamed text: incremental, UTF-8 safe, stop strings."""


class TextStream:
    """Feed token ids, get the text that is safe to publish so far.

    Text is held back while it ends in an incomplete UTF-8 sequence, or could still be the start
    of a stop string (a published prefix cannot be taken back).
    """

    def __init__(self, tokenizer, stop=()):
        self._tokenizer = tokenizer
        self._stop = list(stop)
        self._ids = []
        self.text = ''  # everything decoded, cut at a stop string when one is found
        self.published = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token_id):
        """Add a token; return the new text to publish (possibly '')."""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        for stop in self._stop:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
                self.stopped = True
        self.text = text
        if self.stopped:
            return self.flush()
        safe = len(text)
        if text.endswith('\ufffd'):
            safe = len(text.rstrip('\ufffd'))
        for stop in self._stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        return self._take(safe)

    def flush(self):
        """All remaining text (at the end of the request)."""
        return self._take(len(self.text))

    def _take(self, upto):
        if upto <= self.published:
            return ''
        chunk = self.text[self.published:upto]
        self.published = upto
        return chunk
