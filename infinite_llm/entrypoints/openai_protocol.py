"""Pydantic models of the OpenAI HTTP API subset the server speaks.

Requests accept the OpenAI fields plus the vLLM-style extras `top_k`, `stop_token_ids` and
`ignore_eos`. Unknown fields are ignored (clients such as the official SDK send more than we
use), but fields that would change the output and that we do not implement are rejected with a
clear message instead of being silently dropped (see `unsupported_fields`).

Fields are typed strictly and sampling fields are checked as OpenAI checks them: finite numbers
only, temperature in [0, 2] (below 1e-5 it is greedy decoding), top_p in (0, 1], top_k -1 or 0
(off) or >= 1, max_tokens >= 1, penalties in [-2, 2], n in [1, 64]. The models state these
constraints, so /openapi.json shows them; `SamplingParams.validate` checks them again for callers
of the engine. A bad value gets 400 with `param` naming it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from infinite_llm.sampling import MAX_TEMPERATURE, SamplingParams

# Non-empty, in the schema too (minLength/minItems), so that /openapi.json says what is refused.
_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# A prompt is a string, a list of token ids, or a batch of either.
PromptInput = Union[_Text, _TokenIds, Annotated[list[_Text], Field(min_length=1)],
                    Annotated[list[_TokenIds], Field(min_length=1)]]
# The roles every chat template understands (tools, and so "tool" messages, are not supported).
ChatRole = Literal["system", "user", "assistant"]
_ONLY_ZERO = "not supported: only 0 or null"
_UNTIL_FULL = "null: until the context (max_model_len in /v1/models) is full"
# One HTTP request may fan out to at most this many engine requests (prompts x n).
MAX_CHOICES_PER_REQUEST = 64


class _Lenient(BaseModel):
    """A request body: unknown fields are ignored, known ones are typed strictly.

    Strict as OpenAI is: `"max_tokens": true`, `"stream": "yes"` or `"n": 2.0` are 400, where
    pydantic's lax mode would read them as 1, True and 2. Integers still pass for floats.
    """

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    # Ranges as at OpenAI (and as `SamplingParams.validate` checks them), stated here so that the
    # schema shows them; a value outside gets 400 naming the field.
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=-1, description="-1 or 0: off (vLLM extra)")
    n: int = Field(1, ge=1, le=MAX_CHOICES_PER_REQUEST, description="choices per prompt; prompts x n <= 64")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[_Text, list[_Text]]] = None
    seed: Optional[int] = None
    stop_token_ids: Optional[list[Annotated[int, Field(ge=0)]]] = None  # extra (vLLM)
    ignore_eos: bool = False  # extra (vLLM)
    # OpenAI's range is checked first, so NaN is not taken for "set" and called "not supported".
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, allow_inf_nan=False, description=_ONLY_ZERO)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, allow_inf_nan=False, description=_ONLY_ZERO)
    logit_bias: Optional[dict[str, float]] = Field(None, description="not supported: only empty")
    user: Optional[str] = None

    def unsupported_fields(self) -> list[str]:
        """Output-changing options this server does not implement (the caller answers 400)."""
        bad = []
        if self.presence_penalty:
            bad.append("presence_penalty")
        if self.frequency_penalty:
            bad.append("frequency_penalty")
        if self.logit_bias:
            bad.append("logit_bias")
        return bad

    def _sampling_params(self, max_tokens: Optional[int], seed_offset: int) -> SamplingParams:
        # Choice j of an n>1 request uses seed + j, so seeded choices differ but stay reproducible.
        seed = None if self.seed is None else self.seed + seed_offset
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            seed=seed,
            max_tokens=max_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    max_tokens: Optional[int] = Field(16, ge=1, description=_UNTIL_FULL)
    echo: bool = False
    logprobs: Optional[int] = Field(None, description="not supported: only null")
    best_of: Optional[int] = Field(None, description="not supported: only null, 1 or n")
    suffix: Optional[str] = Field(None, description="not supported: only null or empty")

    def unsupported_fields(self) -> list[str]:
        bad = super().unsupported_fields()
        if self.logprobs is not None:
            bad.append("logprobs")
        if self.best_of not in (None, 1) and self.best_of != self.n:
            bad.append("best_of")
        if self.suffix:
            bad.append("suffix")
        return bad

    def to_sampling_params(self, seed_offset: int = 0) -> SamplingParams:
        return self._sampling_params(self.max_tokens, seed_offset)


class ChatContentPart(_Lenient):
    type: str
    text: Optional[str] = None


class ChatMessage(_Lenient):
    role: ChatRole
    content: Optional[Union[str, list[ChatContentPart]]] = None
    name: Optional[str] = None

    def text_content(self) -> str:
        """The message text; content parts other than text are rejected."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported (text only)")
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[int] = Field(None, ge=1, description=_UNTIL_FULL)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description=_UNTIL_FULL + "; wins over max_tokens")
    logprobs: Optional[bool] = Field(False, description="not supported: only false or null")
    top_logprobs: Optional[int] = Field(None, description="not supported: only null or 0")
    tools: Optional[list[dict[str, Any]]] = Field(None, description="not supported: only null or empty")

    def unsupported_fields(self) -> list[str]:
        bad = super().unsupported_fields()
        if self.logprobs or self.top_logprobs:
            bad.append("logprobs")
        if self.tools:
            bad.append("tools")
        return bad

    @property
    def token_limit_field(self) -> str:
        """The field that bounds the output: max_completion_tokens is the newer name and wins."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self, seed_offset: int = 0) -> SamplingParams:
        return self._sampling_params(getattr(self, self.token_limit_field), seed_offset)


# ------------------------------------------------------------------------------ responses
FinishReason = Optional[Literal["stop", "length", "abort"]]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "infinite-llm"
    max_model_len: Optional[int] = None  # prompt + output tokens one request may hold here
    vocab_size: Optional[int] = None  # lets `bench serve` build valid random token-id prompts


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ------------------------------------------------------------------ non-OpenAI endpoints
class InstanceHealth(BaseModel):
    instance: int
    state: Literal["starting", "alive", "suspect", "dead"]
    last_heartbeat_age_s: Optional[float] = None


class HealthResponse(BaseModel):
    """GET /health: "ok" (all alive), "degraded" (some can serve) or "unavailable" (503, with
    `error`)."""

    status: Literal["ok", "degraded", "unavailable"]
    instances: list[InstanceHealth]
    error: Optional[ErrorInfo] = None
