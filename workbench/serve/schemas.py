"""The HTTP API's request and response bodies (pydantic), shaped like OpenAI's so that its clients work.

Requests forbid unknown fields (a misspelt ``max_token`` is an error that names it, not a silent default);
the few OpenAI fields we accept without acting on them are listed in ``IGNORED``. ``usage`` reports the
cached prompt tokens both as OpenAI does (``prompt_tokens_details.cached_tokens``) and as DeepSeek's API
does (``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 200


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What every generating request may set. Defaults follow OpenAI's (temperature 1, top_p 1, n 1)."""

    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default: 16; the context bounds it)")
    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus mass kept")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the text (not included)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="seeds the sampling of choice i with seed + i")
    n: int = Field(1, ge=1, le=8, description="choices per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as an identifier for the caller's own logs

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return stops


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[int] = Field(description="text, or token ids (then no <|bos|> is added)")


class ChatMessage(_Strict):
    role: str
    content: str | list[dict[str, Any]] = ""
    name: str | None = None


class ChatRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")


class PromptRunRequest(_Strict):
    inputs: dict[str, str | int | float | bool] = Field(default_factory=dict, description="the template's fields")
    expect: str | int | None = Field(None, description="the right answer, when the file does not list these inputs")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)


# ---- responses --------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    prompt_cache_hit_tokens: int  # DeepSeek's API names
    prompt_cache_miss_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> Usage:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
            prompt_cache_hit_tokens=cached,
            prompt_cache_miss_tokens=prompt - cached,
        )


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaCard(BaseModel):
    name: str  # the delta folder's name
    method: str | None = None  # what its recipe trained (lora, newexp, esft_token, ...)
    task: str | None = None  # the vertical's task
    base_fingerprint: str  # the base it applies onto


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "workbench"
    context_length: int
    base: str | None = None  # the model folder served (None: not told)
    deltas: list[DeltaCard] = []  # the verticals applied onto it at load
    routing: str | None = None  # "none", "always" (one delta) or "gate" (each request to its vertical)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptInfo(BaseModel):
    name: str
    description: str
    template: str
    fields: list[str]
    inputs: list[dict[str, Any]]


class PromptSetInfo(BaseModel):
    set: str
    description: str
    task: str | None
    prompts: list[PromptInfo]


class PromptSetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PromptSetInfo]


class PromptRun(BaseModel):
    set: str
    prompt: str
    inputs: dict[str, Any]
    question: str
    completion: str
    thinking: str | None
    answer: str | None
    expect: Any = None
    correct: bool | None  # the task's verifier on answer and expect; None when there is nothing to check
    finish_reason: Literal["stop", "length"] | None
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
