"""IncrementalDetokenizer: deltas that add up to the full decode, stop strings found across token
boundaries and trimmed as the engine's full-decode detokenizer trims them, O(1) work per token."""

from __future__ import annotations

import random
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.detokenizer import IncrementalDetokenizer, TokenStreamDecoder
from infinite_llm.model.loader import resolve_model_path
from infinite_llm.sampling import SamplingParams
from infinite_llm.tokenizer import DEFAULT_SPECIAL_TOKENS, DEFAULT_VOCAB_SIZE, load_tokenizer

NUM_SPECIAL = len(DEFAULT_SPECIAL_TOKENS)  # byte b of byte-level BPE is token NUM_SPECIAL + b
EOS_ID = DEFAULT_SPECIAL_TOKENS.index("</s>")
TEXTS = [
    "Hello, world! The quick brown fox.",
    "Grüße aus Köln — naïve café, 東京タワー, 🎉🚀 and 👩‍👩‍👧 emoji.",
    "mixed\tspaces  and\nnewlines\n\n  indented",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path("default"))


def byte_tokens(text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    return [NUM_SPECIAL + b for b in text.encode("utf-8")]


def stream(tok, ids: list[int], params: SamplingParams, batch_sizes: Optional[list[int]] = None):
    """Feed `ids` in batches; returns (detokenizer, deltas, the step a stop matched or None)."""
    detok = IncrementalDetokenizer(tok, params)
    deltas, stop_step, step, i = [], None, 0, 0
    sizes = iter(batch_sizes or [])
    while i < len(ids) and not detok.finished:
        size = next(sizes, 1)
        delta, stop = detok.update(ids[i:i + size])
        deltas.append(delta)
        i += size
        step += 1
        if stop is not None:
            stop_step = i
    deltas.append(detok.flush())
    return detok, deltas, stop_step


def full_decode_reference(tok, ids: list[int], params: SamplingParams) -> tuple[str, Optional[int]]:
    """What the engine's `_Detokenizer` produces: decode everything after every token, hold back
    a trailing incomplete character, stop at the first stop string. Returns (text, stop step)."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd")
        hits = [(text.find(s), s) for s in params.stop if s in text]
        if hits:
            at, stop = min(hits, key=lambda hit: hit[0])
            return text[:at + len(stop) if params.include_stop_str_in_output else at], n
    return tok.decode(ids, skip_special_tokens=True), None


# ------------------------------------------------------------------------- deltas == decode
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("split", ["tokens", "bytes"])
def test_deltas_concatenate_to_the_full_decode(tok, text, split):
    ids = tok.encode(text, add_special_tokens=False) if split == "tokens" else byte_tokens(text)
    detok, deltas, _ = stream(tok, ids, SamplingParams())
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert detok.text == text
    assert not any("\ufffd" in d for d in deltas)  # split characters were held back, not mangled


def test_an_incomplete_character_is_held_back_until_it_completes(tok):
    detok = IncrementalDetokenizer(tok, SamplingParams())
    pieces = [detok.update([t])[0] for t in byte_tokens("a🎉b")]
    assert pieces == ["a", "", "", "", "🎉", "b"]


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.one_of(
        st.text(min_size=1, max_size=6).map(lambda s: ("text", s)),
        st.lists(st.integers(0, DEFAULT_VOCAB_SIZE - 1), min_size=1, max_size=6).map(lambda ids: ("ids", ids)),
    ), max_size=12),
    batch=st.integers(1, 4),
)
def test_random_token_sequences_decode_like_the_full_decode(tok, chunks, batch):
    """Any ids, special and invalid UTF-8 included, in batches of any size."""
    ids: list[int] = []
    for kind, value in chunks:
        ids += (byte_tokens(value) if len(value) % 2 else tok.encode(value, add_special_tokens=False)) \
            if kind == "text" else value
    _, deltas, _ = stream(tok, ids, SamplingParams(), [batch] * len(ids))
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_long_runs_of_invalid_utf8_keep_the_window_bounded(tok):
    # A model emitting lone continuation bytes forever: each decodes to U+FFFD on its own. The
    # undecided tail (and with it the work per token) must stay bounded, and the text exact.
    ids = [NUM_SPECIAL + 0x80] * 500 + byte_tokens("€ ok") + [EOS_ID] * 300 + byte_tokens("end")
    decoder = TokenStreamDecoder(tok)
    widest = 0
    pieces = []
    for t in ids:
        pieces.append(decoder.add(t))
        widest = max(widest, len(decoder.ids) - decoder.prefix_offset)
    pieces.append(decoder.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert widest <= 2 * TokenStreamDecoder._MAX_PENDING_TOKENS


# ------------------------------------------------------------------------------ stop strings
def test_a_stop_string_straddling_tokens_is_found_and_trimmed(tok):
    ids = byte_tokens("Hello STOP world")  # "STOP" arrives one byte (token) at a time
    for include in (False, True):
        params = SamplingParams(stop=["STOP"], include_stop_str_in_output=include)
        detok, deltas, stop_step = stream(tok, ids, params)
        expected = "Hello STOP" if include else "Hello "
        assert detok.text == "".join(deltas) == expected
        assert detok.stop_str == "STOP" and stop_step == len(byte_tokens("Hello STOP"))
        assert (detok.text, stop_step) == full_decode_reference(tok, ids, params)


def test_text_that_may_start_a_stop_string_is_not_sent_early(tok):
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["abcd"]))
    sent = "".join(detok.update([t])[0] for t in byte_tokens("xyzabc"))
    assert sent == "xyz"  # "abc" could still become "abcd"
    assert detok.update(byte_tokens("e")) == ("abce", None)
    assert detok.flush() == ""


def test_without_a_stop_match_flush_returns_the_held_back_text(tok):
    detok, deltas, stop_step = stream(tok, byte_tokens("the end is nigh"), SamplingParams(stop=["nighty"]))
    # Only "nigh" could still grow into the stop string; the rest went out as it came.
    assert stop_step is None and deltas[-1] == "nigh" and "".join(deltas) == "the end is nigh"


def test_updates_after_a_stop_are_ignored(tok):
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["."]))
    assert detok.update(byte_tokens("Hi. More")) == ("Hi", ".")
    assert detok.update(byte_tokens(" text")) == ("", None)
    assert detok.flush() == "" and detok.text == "Hi"


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="ab é🎉.", max_size=30),
    stops=st.lists(st.text(alphabet="ab é🎉.", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
    by_bytes=st.booleans(),
)
def test_stop_strings_match_the_full_decode_detokenizer(tok, text, stops, include, by_bytes):
    ids = byte_tokens(text) if by_bytes else tok.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok, deltas, stop_step = stream(tok, ids, params)
    expected_text, expected_step = full_decode_reference(tok, ids, params)
    assert (detok.text, stop_step) == (expected_text, expected_step)
    assert "".join(deltas) == detok.text


# ------------------------------------------------------------------------------ cost
def test_work_per_token_does_not_grow_with_the_output(tok):
    """Decode calls see a bounded window, however long the output gets."""
    widths: list[int] = []

    class CountingTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            widths.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    rng = random.Random(0)
    ids = tok.encode(" ".join(rng.choice(["alpha", "é", "🎉", "the", "x"]) for _ in range(3000)),
                     add_special_tokens=False)
    detok = IncrementalDetokenizer(CountingTokenizer(), SamplingParams(stop=["never happens"]))
    for t in ids:
        detok.update([t])
    assert len(ids) > 2000 and max(widths) <= 16
    assert len(widths) <= 2 * len(ids)


def test_the_old_import_path_still_works():
    from infinite_llm.tokenizer import IncrementalDetokenizer as Legacy

    assert Legacy is TokenStreamDecoder
