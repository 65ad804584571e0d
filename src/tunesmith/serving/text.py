"""Token ids to streamed text: incremental detokenization (a multi-byte character is held until
it is whole) and stop sequences (text that might be the start of one is held back, and a match
ends the completion with the stop text cut off, as OpenAI does)."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """The text this token makes safe to send (maybe empty); sets `stopped` on a stop sequence."""
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        # The earliest match wins, whichever stop it is: one token can complete two of them.
        found = [at for at in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if at != -1]
        if found:
            self.stopped = True
            cut = text[:min(found)]
            delta, self.sent = cut[self.sent:], max(self.sent, len(cut))
            return delta
        safe = len(text) - self._held(text)
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def flush(self) -> str:
        """Whatever was held back, once the completion ends for another reason."""
        if self.stopped:
            return ""
        text = self._text()
        delta = text[self.sent:]
        self.sent = len(text)
        return delta

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop sequence."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
