"""The HTTP request bodies `tunesmith serve` accepts, as pydantic models (OpenAI's and vLLM's field names).

Unknown fields are refused (a misspelt `max_token` would otherwise be ignored without a word); values out of range
are answered with 400 and the field's name, a body of the wrong shape with 422 (see app.py's handlers).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # OpenAI accepts up to 4 stop sequences
MAX_INPUTS = 256  # texts per /v1/classify request, responses per /v1/score request


class Body(BaseModel):
    """A request body: unknown fields are an error, not silently dropped; text must be text (no lone surrogates,
    which the tokenizer and the request log can't encode)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _encodable(cls, value):
        for text in _strings(value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("holds a lone surrogate (an escape like \\ud800 that is not a character)") from None
        return value


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


class TextPart(Body):
    """A part of a message's content (OpenAI's content-parts form); only text parts."""

    type: Literal["text"] = Field(description="the part's kind: only text")
    text: str


class Message(Body):
    """One chat turn; OpenAI's `developer` role is a system turn, content parts are joined into one text."""

    role: Literal["system", "developer", "user", "assistant"] = Field(description="who speaks")
    content: Union[str, list[TextPart]] = Field(description="what is said: a text, or a list of text parts")
    name: Optional[str] = Field(None, description="OpenAI's optional speaker name (kept out of the prompt)")

    def as_dict(self) -> dict[str, str]:
        """The turn as the chat template reads it."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(Body):
    include_usage: bool = Field(False, description="send a last chunk with the token counts")


class Sampling(Body):
    """Generation settings shared by chat and text completions."""

    model: str = Field(description="the served run's name, or a loaded adapter's name (GET /v1/models)")
    max_tokens: Optional[int] = Field(None, ge=1, description="new tokens at most (default: the server's cap)")
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False,
                                         description="0 = greedy (the default, as `tunesmith generate`)")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling mass")
    stop: Optional[Union[str, list[str]]] = Field(None, description="text that ends the answer (not included)")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="same seed, same sampled answer")
    stream: bool = Field(False, description="answer as server-sent events ending in `data: [DONE]`")
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="answers per request (only 1)")
    user: Optional[str] = Field(None, description="the end user's id (OpenAI's field; logged nowhere)")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence is empty")
        return stops

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class ChatRequest(Sampling):
    """POST /v1/chat/completions"""

    messages: list[Message] = Field(min_length=1, description="the conversation, ending with a user turn")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="OpenAI's newer name for max_tokens")


class CompletionRequest(Sampling):
    """POST /v1/completions"""

    prompt: Union[str, list[str]] = Field(description="the text to continue (one prompt)")
    max_tokens: Optional[int] = Field(16, ge=1, description="new tokens at most (OpenAI's default 16)")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt per request")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value


class ClassifyRequest(Body):
    """POST /v1/classify"""

    model: str
    input: Union[str, list[str]] = Field(description="a text, or a list of texts, to label")

    @field_validator("input")
    @classmethod
    def _texts(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > MAX_INPUTS:
            raise ValueError(f"give 1 to {MAX_INPUTS} texts")
        if any(not t.strip() for t in texts):
            raise ValueError("a text is empty")
        return texts


class ScoreRequest(Body):
    """POST /v1/score: replies to one prompt, scored by a reward-model run."""

    model: str
    prompt: Optional[str] = Field(None, description="the user's message (or a Human:/Assistant: transcript)")
    messages: Optional[list[Message]] = Field(None, min_length=1, description="or the conversation so far")
    responses: list[str] = Field(min_length=1, max_length=MAX_INPUTS, description="the replies to score")

    def conversation(self) -> list[dict[str, str]]:
        from tunesmith.data.format import transcript_messages

        if self.messages:
            return [m.as_dict() for m in self.messages]
        return transcript_messages(self.prompt or "")


class FeedbackRequest(Body):
    """POST /v1/feedback"""

    request_id: str = Field(min_length=1, max_length=200)
    rating: Optional[Literal["up", "down"]] = None
    correction: Optional[str] = Field(None, description="the answer the user wanted instead")


class LoadAdapterRequest(Body):
    """POST /v1/load_lora_adapter (vLLM's payload)"""

    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1, description="a run folder trained on the served run's base model")


class UnloadAdapterRequest(Body):
    """POST /v1/unload_lora_adapter (vLLM's payload)"""

    lora_name: str = Field(min_length=1, max_length=200)
    lora_int_id: Optional[int] = None
