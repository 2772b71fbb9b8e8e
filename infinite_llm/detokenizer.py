"""Incremental detokenization: O(1) host work per generated token, stop strings included.

Decoding the whole output at every step (what `engine._Detokenizer` does) costs O(n) per token,
O(n^2) per request. Here each token decodes only a small window of recent tokens, the prefix /
read offsets of vLLM's `detokenize_incrementally`:

* ids[prefix_offset:read_offset] is text already emitted, decoded again only as context (a
  token can decode differently alone than after its neighbours, e.g. SentencePiece's leading
  space);
* ids[read_offset:] is not emitted yet. While its text ends in U+FFFD (an incomplete UTF-8
  character split across tokens) it is held back until the completing tokens arrive.

`TokenStreamDecoder` is that core (moved here from `tokenizer.IncrementalDetokenizer`, which
stays as an alias). `IncrementalDetokenizer` adds what a request needs on top: stop strings
(detected even when they straddle tokens, trimmed per `include_stop_str_in_output`) and deltas
that never show text a stop string may later take back.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from infinite_llm.sampling import SamplingParams

__all__ = ["TokenStreamDecoder", "IncrementalDetokenizer"]


class TokenStreamDecoder:
    """Turns a stream of token ids into a stream of text pieces.

    Each `add()` returns only the newly finished text. The concatenation of all pieces plus
    `flush()` equals `tokenizer.decode(all ids, skip_special_tokens=...)`.
    """

    # Prompt tokens decoded as context for the first output token.
    _CONTEXT_TOKENS = 5
    # A real incomplete UTF-8 character spans at most 3 bytes, so at most a few tokens. A longer
    # undecided tail means the model emits invalid UTF-8 on and on; past this bound the settled
    # part of it is emitted so that the window, and the work per token, stays bounded.
    _MAX_PENDING_TOKENS = 32
    # Safe margin kept undecided when forcing: more tokens than an incomplete character spans.
    _FORCE_KEEP_TOKENS = 4
    # Emitted ids are dropped from the front once this many pile up (they are never read again).
    _COMPACT_AT = 1024

    def __init__(self, tokenizer: Any, prompt_ids: Optional[Sequence[int]] = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        prompt = list(prompt_ids or [])
        self.ids: list[int] = prompt[-self._CONTEXT_TOKENS:]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - self._CONTEXT_TOKENS)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or not full.startswith(emitted):
            # An incomplete character at the end: wait for the tokens that complete it.
            if len(self.ids) - self.read_offset > self._MAX_PENDING_TOKENS:
                return self._force(emitted, full)
            return ""
        if len(full) == len(emitted):
            # A token without text of its own (e.g. a skipped special token) is settled too.
            # The prefix stays as context, but only for a few tokens, so that a long run of
            # such tokens does not widen the decode window.
            self.read_offset = len(self.ids)
            self.prefix_offset = max(self.prefix_offset, self.read_offset - self._CONTEXT_TOKENS)
            self._compact()
            return ""
        return self._advance(full[len(emitted):], len(self.ids))

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated UTF-8 character, as U+FFFD)."""
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        piece = full[len(emitted):] if full.startswith(emitted) else ""
        return self._advance(piece, len(self.ids))

    def _advance(self, piece: str, new_read_offset: int) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, new_read_offset
        self._compact()
        return piece

    def _compact(self) -> None:
        if self.prefix_offset >= self._COMPACT_AT:
            del self.ids[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0

    def _force(self, emitted: str, full: str) -> str:
        """Emit the undecided tail up to a split whose text the later tokens cannot change."""
        for split in range(len(self.ids) - self._FORCE_KEEP_TOKENS, self.read_offset, -1):
            head = self._decode(self.ids[self.prefix_offset:split])
            # Lossy UTF-8 decoding looks at most 3 bytes ahead, and the kept tokens hold at least
            # that many: if `full` starts with `head`, no later token changes `head`'s text.
            if head.startswith(emitted) and full.startswith(head):
                return self._advance(head[len(emitted):], split)
        # No safe split: emit everything rather than let the window (and the work per token) grow.
        return self._advance(full[len(emitted):] if full.startswith(emitted) else "", len(self.ids))


class IncrementalDetokenizer:
    """Detokenizes one request's output incrementally, with stop strings.

    `update(new_token_ids)` returns `(delta, stop)`: the text that became final with these
    tokens, and the stop string matched (None if none). While the request runs, a tail of the
    text that begins some stop string is held back (more tokens could complete the stop string,
    which is then trimmed), and so is an incomplete UTF-8 character. Once a stop string
    matched, the text ends there (or after it, with `include_stop_str_in_output`) and later
    updates return `("", None)`. A request that ends otherwise (EOS, length, abort) calls
    `flush()` for the held-back rest. So the deltas always concatenate to `text`, and without
    stop strings to `tokenizer.decode(all ids, skip_special_tokens=True)`.

    Cost: O(1) per token for `update()` (small decode windows, stop search over the new piece
    plus the held-back characters, which are fewer than the longest stop string). `text` joins
    the deltas, O(len) when it changed.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams,
                 prompt_token_ids: Optional[Sequence[int]] = None) -> None:
        self.params = params
        self._decoder = TokenStreamDecoder(tokenizer, prompt_token_ids, skip_special_tokens=True)
        self._stops = list(params.stop)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._deltas: list[str] = []  # everything returned so far
        self._held = ""  # accepted text not returned yet: it may start a stop string
        self.stop_str: Optional[str] = None  # the stop string that ended the text, if any
        self.finished = False

    @property
    def text(self) -> str:
        """The full text so far, up to (or through) a matched stop string."""
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return (self._deltas[0] if self._deltas else "") + self._held

    def update(self, new_token_ids: Sequence[int]) -> tuple[str, Optional[str]]:
        if self.finished:
            return "", None
        piece = "".join([self._decoder.add(t) for t in new_token_ids])
        return self._accept(piece, final=False)

    def flush(self) -> str:
        """The request ended without a stop string: return the held-back rest of the text."""
        if self.finished:
            return ""
        delta, _ = self._accept(self._decoder.flush(), final=True)
        self.finished = True
        return delta

    def _accept(self, piece: str, final: bool) -> tuple[str, Optional[str]]:
        # A stop string straddling the previous text ends inside `piece` and starts in a tail
        # of the previous text that begins a stop string, i.e. inside the held-back text.
        window = self._held + piece
        match = _first_stop(window, self._stops)
        if match is not None:
            at, stop = match
            end = at + len(stop) if self.params.include_stop_str_in_output else at
            delta, self._held = window[:end], ""
            self.stop_str, self.finished = stop, True
        else:
            keep = 0 if final else _stop_prefix_length(window, self._stops, self._hold)
            delta, self._held = window[:len(window) - keep], window[len(window) - keep:]
        if delta:
            self._deltas.append(delta)
        return delta, self.stop_str if match is not None else None


def _stop_prefix_length(text: str, stops: Sequence[str], limit: int) -> int:
    """Length of the longest tail of `text` (at most `limit`) that begins some stop string.

    Only that tail can turn into a stop string with more tokens; holding back exactly it (not
    a fixed `limit` characters) sends everything else at once.
    """
    for length in range(min(limit, len(text)), 0, -1):
        tail = text[-length:]
        if any(stop.startswith(tail) for stop in stops):
            return length
    return 0


def _first_stop(text: str, stops: Sequence[str]) -> Optional[tuple[int, str]]:
    """The earliest occurrence of any stop string in `text` (list order breaks ties)."""
    best: Optional[tuple[int, str]] = None
    for stop in stops:
        at = text.find(stop)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    return best
