"""The API's request and response shapes, for ``/openapi.json`` only: the handlers parse
and check bodies themselves (off the event loop when big, and with OpenAI's error shape),
so these models describe what the handlers accept rather than enforce it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

__all__ = ["ChatRequest", "CompletionRequest", "EmbeddingRequest", "described"]


class EmbeddingRequest(BaseModel):
    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)] = Field(
        description="a text, or a list of texts (each within the model's token limit)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32")
    user: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="a last event with the token counts "
                                "(and no choices)")


class _Sampling(BaseModel):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(
        None, description="generation stops before the first of these (the model's "
        "end-of-sequence token stops it too)")
    stream: bool | None = Field(False, description="server-sent events, ending with "
                                "'data: [DONE]'")
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="one prompt, not empty")
    max_tokens: int = Field(16, ge=1, le=1 << 20, description="the prompt and this must "
                            "fit in the model's context (else 400 context_length_exceeded); "
                            "not given: 16, or what room the context has left")
    best_of: Literal[1] = 1


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(
        description="a text, or a list of text parts {'type': 'text', 'text': ...}")
    name: str | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="rendered with the model's chat template")
    max_tokens: int | None = Field(None, ge=1, le=1 << 20, description="as "
                                   "max_completion_tokens; not given: the rest of the "
                                   "context")
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int | None = None


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatAnswer(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatAnswer
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    models: list[str] | None = None
    model: str | None = None
    error: str | None = None


_ERRORS = {
    400: "the body is not JSON, lacks a field or has a wrong one, or an input is too long "
         "(code context_length_exceeded)",
    401: "missing or wrong API key (with --api-key)",
    404: "unknown model",
    408: "the request body did not arrive in time",
    413: "the request body is over --max-body-bytes",
    429: "--max-queue requests are already waiting; retry later",
    503: "a stage has failed, or its worker is gone and being replaced (Retry-After says "
         "when to try again)",
}

_ANSWERS: dict[str, type[BaseModel]] = {
    "embeddings": EmbeddingList, "completions": Completion, "chat": ChatCompletion,
    "models": ModelList, "health": Health}


def described(answer: str, request: type[BaseModel] | None = None,
              errors: tuple[int, ...] = ()) -> dict[str, Any]:
    """Route keywords that describe a handler reading ``Request`` itself: its request
    body (``request``), its 200 answer (a key of ``_ANSWERS``) and its ``errors``."""
    responses: dict[int | str, dict[str, Any]] = {
        200: {"model": _ANSWERS[answer], "description": "OK"}}
    responses.update({s: {"model": ErrorResponse, "description": _ERRORS[s]} for s in errors})
    described: dict[str, Any] = {"responses": responses, "response_model": None}
    if request is not None:
        described["openapi_extra"] = {"requestBody": {"required": True, "content": {
            "application/json": {"schema": request.model_json_schema()}}}}
    return described
