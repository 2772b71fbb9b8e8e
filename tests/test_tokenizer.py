"""The built-in tokenizer, the checkpoint tokenizer wrapper, chat templates, streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.tokenizer import (
    BOS_TOKEN,
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN,
    IncrementalDetokenizer,
    TemplateError,
    Tokenizer,
    build_default_tokenizer,
    load_tokenizer,
    write_default_tokenizer,
)

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🎉👩‍💻 and math ∑∫√",
    "",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\r\nlines\n\n",
    "<s> literal special tokens </s> inside text",
    "What is the capital of France? The capital of France is Paris.",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    write_default_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def test_default_tokenizer_is_deterministic_and_fits_vocab():
    a, b = build_default_tokenizer(), build_default_tokenizer()
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size(with_added_tokens=True) == DEFAULT_VOCAB_SIZE
    assert [a.id_to_token(i) for i in range(4)] == ["<unk>", BOS_TOKEN, EOS_TOKEN, "<pad>"]
    assert a.id_to_token(4 + ord("a")) == "a"  # byte b has id 4 + b


def test_default_tokenizer_splits_text_as_the_bpe_trainer_learned():
    """Its merges are those tokenizers' BpeTrainer learns from the built-in corpus (the ids are
    ours: byte b is 4 + b), so it splits any text into the same tokens as the trained model."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    from infinite_llm.tokenizer import _MERGE_CORPUS, DEFAULT_SPECIAL_TOKENS

    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator([_MERGE_CORPUS], trainers.BpeTrainer(
        vocab_size=DEFAULT_VOCAB_SIZE, special_tokens=list(DEFAULT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    ours = build_default_tokenizer()
    for text in [_MERGE_CORPUS, *SAMPLES]:
        assert ours.encode(text, add_special_tokens=False).tokens == trained.encode(text).tokens


def test_common_words_are_single_tokens(tok):
    for word in (" the", " of", " and", " is", "The"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    text = "What is the capital of France?"
    assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_special_token_ids_and_bos(tok):
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2] and tok.eos_token_id == 2
    assert tok.vocab_size == DEFAULT_VOCAB_SIZE
    assert tok.encode("hi")[0] == 1
    assert tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.decode(tok.encode("hi")) == "hi"
    assert tok.decode(tok.encode("hi"), skip_special_tokens=False) == "<s>hi"


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_auto_tokenizer(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok(text).input_ids
    assert tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trips_arbitrary_unicode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < DEFAULT_VOCAB_SIZE for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_eos_ids_merge_generation_config_and_config(tmp_path):
    write_default_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9, "bos_token_id": 1}))
    assert load_tokenizer(tmp_path).eos_token_ids == [7, 2, 9]


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


# --------------------------------------------------------------------------- chat templates

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_chat_template_matches_transformers(tok, hf_tok, add_generation_prompt):
    ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|system|>\nYou are terse.</s>\n<|user|>\nHi there!</s>\n")
    assert ours.endswith("<|assistant|>\n") == add_generation_prompt


def test_template_raise_exception_and_bad_messages(tok):
    with pytest.raises(TemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="without a 'role'"):
        tok.apply_chat_template([{"content": "x"}])


def test_checkpoint_template_with_bos_and_trim_blocks(tmp_path, hf_tok):
    from transformers import AutoTokenizer

    write_default_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # Llama-2 style: bos_token variable, block tags on their own lines (trim_blocks/lstrip_blocks).
    config["chat_template"] = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "[INST] {{ m['content'] | trim }} [/INST]\n"
        "    {% else %}\n"
        "{{ m['content'] }}{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(tmp_path).apply_chat_template(MESSAGES[1:])
    theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES[1:], tokenize=False)
    assert ours == theirs
    assert ours.startswith("<s>\n[INST] Hi there! [/INST]\n")


def test_checkpoint_without_template_uses_default(tmp_path):
    write_default_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template is None
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|user|>\nx</s>\n<|assistant|>\n"


# --------------------------------------------------------------------------- streaming decode


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(i) for i in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_detokenizer_equals_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    pieces, rest = _stream(tok, ids, prompt=tok.encode("Prompt:"))
    assert rest == ""
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_detokenizer_holds_back_partial_utf8(tok):
    # "🎉" is 4 bytes; as byte tokens it arrives one byte per token.
    ids = [4 + b for b in "a🎉b".encode()]
    pieces, _ = _stream(tok, ids)
    assert pieces == ["a", "", "", "", "🎉", "b"]


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=DEFAULT_VOCAB_SIZE - 1), max_size=40))
def test_incremental_detokenizer_on_arbitrary_ids(tok, ids):
    """Even invalid UTF-8 and special tokens: the stream plus flush() equals decode(all)."""
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids)
