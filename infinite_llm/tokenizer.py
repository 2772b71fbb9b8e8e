"""Tokenizers without downloads: the built-in byte-level BPE and a wrapper for checkpoint folders.

`build_default_tokenizer()` makes the default model's tokenizer: 4 special tokens, the 256
byte tokens of byte-level BPE (so any text round-trips), and merges that the tokenizers library's
`BpeTrainer` learns (deterministically) from a small built-in English text, so common words are
single tokens. 4 + 256 + 252 = 512
entries, the default model's vocab_size.

`Tokenizer` wraps any HF `tokenizer.json` folder the way `AutoTokenizer` reads it (BOS from the
tokenizer.json post-processor, special tokens and chat template from tokenizer_config.json,
EOS ids from generation_config.json / config.json), using only the `tokenizers` library and jinja2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from infinite_llm.detokenizer import TokenStreamDecoder

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
DEFAULT_SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0..3
DEFAULT_VOCAB_SIZE = 512

# Used for checkpoints without a chat template, and shipped as the default model's template.
# Role markers are plain text; the BOS is added by encode(), so the template does not emit it.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ '; expected system, user or assistant') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Merges are learned from this text. Changing it changes the default tokenizer (and so the
# default model's version: bump default_model.DEFAULT_MODEL_VERSION with it).
_MERGE_CORPUS = """\
The quick brown fox jumps over the lazy dog. This is a small text that the default tokenizer
learns its merges from, so that common English words become single tokens. It is written in
plain language about everyday things: the weather, the time of day, and what people do.

Once upon a time there was a little girl who lived in a house near the forest. Every morning
she would walk to the river and look at the water. She liked to watch the birds and the fish.
One day she saw something new in the water. It was a small boat with a red sail. She asked her
mother what it was, and her mother told her that it came from a town far away.

What is the capital of France? The capital of France is Paris. What is two plus two? Two plus
two is four. How are you today? I am fine, thank you. Can you help me with this question? Yes,
of course. Here is the answer you are looking for, and here is why it is the right one.

A language model reads a sequence of tokens and predicts the next one. The model has layers of
attention and feed forward networks. During generation, the keys and values of every token are
kept in a cache, so that each new token only needs one step of the model. Long requests need a
large cache, and the memory of one machine may not be enough; the cache can then be spread over
many machines that work together to serve the request.

The system should be fast, simple and correct. We want to serve many users at the same time,
with short and long questions, and give each of them an answer as soon as we can. When there is
more work than we can do, new requests wait in a queue until there is room for them.
"""


def _learn_merges(pre: pre_tokenizers.PreTokenizer, num_merges: int) -> list[tuple[str, str]]:
    """`num_merges` BPE merges learned from `_MERGE_CORPUS` by the tokenizers library's trainer
    (deterministic: the most frequent pair first, ties broken by the pair)."""
    scratch = HFTokenizer(models.BPE())
    scratch.pre_tokenizer = pre
    # The trainer's vocab_size counts the special tokens and the whole byte alphabet too.
    trainer = trainers.BpeTrainer(
        vocab_size=len(DEFAULT_SPECIAL_TOKENS) + 256 + num_merges,
        special_tokens=list(DEFAULT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    scratch.train_from_iterator([_MERGE_CORPUS], trainer)
    merges = json.loads(scratch.to_str())["model"]["merges"]
    # tokenizers before 0.20 writes a merge as "a b", later versions as ["a", "b"].
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def byte_level_symbols() -> list[str]:
    """The printable character byte-level BPE uses for each byte 0..255 (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    symbols, shift = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def build_default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> HFTokenizer:
    """The built-in byte-level BPE tokenizer (deterministic; needs no download)."""
    base = len(DEFAULT_SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size must be at least {base} (special tokens + 256 bytes), got {vocab_size}")
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    byte_symbols = byte_level_symbols()
    if set(byte_symbols) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte-level alphabet of the tokenizers library differs from GPT-2's")
    # Our own ids rather than the trainer's (which orders the alphabet by character): byte b gets
    # id len(DEFAULT_SPECIAL_TOKENS) + b, and merged tokens follow in merge order.
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(DEFAULT_SPECIAL_TOKENS)}
    for symbol in byte_symbols:
        vocab[symbol] = len(vocab)
    merges = _learn_merges(pre, vocab_size - base)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in DEFAULT_SPECIAL_TOKENS])
    bos_id = vocab[BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


def default_tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json contents for the built-in tokenizer (read by us and by AutoTokenizer)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }


def write_default_tokenizer(folder: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json of the built-in tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Pretty-printed JSON with sorted vocab (tokenizers serialises the vocab in id order), so the
    # bytes are the same on every build.
    (folder / "tokenizer.json").write_text(build_default_tokenizer().to_str(pretty=True), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(default_tokenizer_config(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


# --------------------------------------------------------------------------- checkpoint tokenizer


def _token_content(value: Any) -> Optional[str]:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _raise_template_exception(message: str) -> None:
    raise TemplateError(message)


class TemplateError(ValueError):
    """A chat template rejected its input (the template called raise_exception)."""


@dataclass
class Tokenizer:
    """A checkpoint's tokenizer; build with `load_tokenizer(path)`."""

    backend: HFTokenizer
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    eos_token_ids: list[int] = field(default_factory=list)
    chat_template: Optional[str] = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # template variables: unk_token, ...

    @property
    def bos_token_id(self) -> Optional[int]:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        # BOS/EOS come from tokenizer.json's post-processor, as in AutoTokenizer (transformers 5
        # ignores tokenizer_config's add_bos_token; v4 wrote it into the post-processor on save).
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[Optional[str]]:
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render the chat template like HF: sandboxed jinja2, trim/lstrip blocks, raise_exception."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts with 'role' and 'content'")
        for m in messages:
            if "role" not in m:
                raise ValueError(f"message without a 'role': {m!r}")
        template = _compile_template(self.chat_template or DEFAULT_CHAT_TEMPLATE)
        variables = dict(self.special_tokens)
        variables.update(bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        variables.update(extra)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(source: str):
    compiled = _TEMPLATE_CACHE.get(source)
    if compiled is None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

        def tojson(value: Any, indent: Optional[int] = None, ensure_ascii: bool = False, **_: Any) -> str:
            return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = _raise_template_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        compiled = env.from_string(source)
        _TEMPLATE_CACHE[source] = compiled
    return compiled


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of an HF checkpoint folder (tokenizer.json required)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{tokenizer_file} is missing; a fast-tokenizer tokenizer.json is required "
            "(slow sentencepiece-only tokenizers are not supported)"
        )
    backend = HFTokenizer.from_file(str(tokenizer_file))
    tok_config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    model_config = _read_json(folder / "config.json")
    gen_config = _read_json(folder / "generation_config.json")

    def special(name: str) -> Optional[str]:
        return _token_content(tok_config.get(name, special_map.get(name)))

    bos_token = special("bos_token")
    if bos_token is None and model_config.get("bos_token_id") is not None:
        bos_token = backend.id_to_token(int(model_config["bos_token_id"]))
    eos_token = special("eos_token")

    eos_ids: list[int] = []
    for source in (gen_config.get("eos_token_id"), model_config.get("eos_token_id")):
        eos_ids += _as_id_list(source)
    if eos_token is not None and backend.token_to_id(eos_token) is not None:
        eos_ids.append(backend.token_to_id(eos_token))
    if eos_token is None and eos_ids:
        eos_token = backend.id_to_token(eos_ids[0])
    eos_ids = list(dict.fromkeys(eos_ids))

    chat_template = tok_config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in chat_template}
        chat_template = named.get("default") or next(iter(named.values()), None)
    jinja_file = folder / "chat_template.jinja"
    if chat_template is None and jinja_file.is_file():
        chat_template = jinja_file.read_text(encoding="utf-8")

    specials = {
        name: value
        for name in ("unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
        if (value := special(name)) is not None
    }
    return Tokenizer(
        backend=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        eos_token_ids=eos_ids,
        chat_template=chat_template,
        special_tokens=specials,
    )


# --------------------------------------------------------------------------- streaming decode

# The streaming decoder moved to `infinite_llm.detokenizer` (with the per-request stop-string
# handling built on it); this name stays for existing imports.
IncrementalDetokenizer = TokenStreamDecoder
