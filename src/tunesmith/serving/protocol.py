"""The OpenAI request bodies the server accepts, and its error shape. Fields OpenAI defines that
the server does not implement are refused by name (400) when set to anything but their
default, so a client never gets silently different behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


@dataclass
class Limits:
    """What one request may ask of the server."""

    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256  # chat requests that do not say
    max_request_bytes: int = 1_000_000
    max_batch_size: int = 32
    max_queue: int = 256


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logprobs: Union[bool, int, None] = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 sequences", param="stop")
        return stops


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


# field -> the values meaning "not used"; anything else is refused by name.
UNSUPPORTED = {
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None,),
    "function_call": (None,), "logit_bias": (None, {}), "echo": (False,), "suffix": (None,), "best_of": (None, 1),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}


def refuse_unsupported(body: dict) -> None:
    for key, neutral in UNSUPPORTED.items():
        if key in body and body[key] not in neutral:
            raise ApiError(400, f"{key} is not supported by this server", param=key, code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: only {'type': 'text'} is supported", param="response_format",
                       code="unsupported_parameter")
