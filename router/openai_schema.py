"""OpenAI-compatible request bodies and errors: what a request may say, and how a bad one is answered.

Bodies are strict pydantic models (``"0.7"`` is not a temperature); every problem becomes one OpenAI-style
error that names the field, ``{"error": {"message", "type", "param", "code"}}``, never a stack trace.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from router.sampling import MAX_LOGPROBS, SamplingParams, SamplingParamsError

# OpenAI fields we do not implement: a client that sets them would silently get something else. None and the
# values listed (the "off" settings) are accepted.
UNSUPPORTED = {"echo": (False,), "suffix": ("",), "best_of": (1,), "logit_bias": ({},), "tools": ([],),
               "functions": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},)}



# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def internal_error(e: BaseException) -> ApiError:
    # The type name helps whoever reads the server log; the stack trace stays there.
    return ApiError(500, f"internal error ({type(e).__name__}); the server log has the details", "server_error")


def _loc_name(loc: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


def validation_error(err: ValidationError) -> ApiError:
    """pydantic's list of problems -> one sentence that names the field (the first problem is enough to fix)."""
    first = err.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['ctx']['error']}")
    param = _loc_name(first["loc"])
    if not param:
        return bad_request("the request body must be a JSON object")
    if first["type"] == "missing":
        return bad_request(f"{param} is required", param)
    what = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"][0].lower() + first["msg"][1:]
    given = json.dumps(first["input"], ensure_ascii=False, default=str)  # as the client wrote it
    return bad_request(f"{param}: {what}" + (f", got {given}" if len(given) <= 40 else ""), param)


# ----------------------------------------------------------------------------- request bodies


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and (isinstance(value[0], str) or _token_ids(value[0])):
        value = value[0]  # a batch of one, as some clients always send
    if not (isinstance(value, str) or _token_ids(value)):
        raise ValueError("must be a string or a list of token ids (one prompt per request)")
    if not value:
        raise ValueError("must not be empty")
    return value


def _stop(value: Any) -> Any:
    if value is not None and not isinstance(value, str) and not (
            isinstance(value, list) and all(isinstance(s, str) for s in value)):
        raise ValueError("must be a string or a list of strings")
    return value


def _content(value: Any) -> str | list[dict]:
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content parts")
    for part in value:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ValueError('only text parts ({"type": "text", "text": ...}) are supported')
    return value


class _Body(BaseModel):
    # strict: "0.7" is not a temperature and true is not 1. Unknown fields are allowed: clients send ones we
    # ignore (user, metadata), and UNSUPPORTED catches the ones that would change the answer.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingBody(_Body):
    """Fields both endpoints share. None means "the default", so clients that send explicit nulls work."""

    model: str | None = None  # None: the one model served
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = None
    stop: Annotated[Any, AfterValidator(_stop)] = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionBody(SamplingBody):
    prompt: Annotated[Any, AfterValidator(_prompt)]
    max_tokens: int | None = Field(None, ge=1)  # None: 16, as OpenAI
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[Any, AfterValidator(_content)] = None


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "ignore_eos")


def check_unsupported(body: _Body) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value is not None and value not in UNSUPPORTED[name]:
            raise bad_request(f"{name} is not supported by this server", name)


def sampling_params(body: SamplingBody, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    if body.n not in (None, 1):
        raise bad_request(f"n: only n=1 is supported (send {body.n} requests instead), got {body.n}", "n")
    fields = {name: getattr(body, name) for name in SAMPLING_FIELDS}
    fields.update(max_tokens=max_tokens, logprobs=logprobs)
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except SamplingParamsError as e:  # its message starts with the parameter's name
        raise bad_request(str(e), str(e).split(" ", 1)[0]) from None
