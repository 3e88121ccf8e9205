"""Chat and text completions through the batching engine: the token budget, the answer as one JSON or as
server-sent events, and its times, tokens and finish reason in the request log and the metrics."""

from __future__ import annotations

import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from tunesmith.errors import TunesmithError
from tunesmith.serve import schemas
from tunesmith.serve.http import ApiError, error_body, metric_name, record, start_row
from tunesmith.serve.metrics import Timing

async def generate_answer(app: FastAPI, request: Request, body: schemas.Sampling, ids: list[int],
                          adapter: str | None, chat: bool, max_tokens: int | None):
    """The engine's answer to prompt `ids` (through `adapter`, None = the served run) as a chat or text completion:
    one JSON, or server-sent events with `body.stream`; logged and counted either way."""
    from tunesmith.serve.engine import GenRequest, QueueFull

    served, options = app.state.served, app.state.options
    new_tokens = _token_budget(served, options, len(ids), max_tokens)
    temperature = body.temperature if body.temperature is not None else 0.0
    job = GenRequest(ids, new_tokens, temperature, body.top_p, body.seed, body.stops(), adapter, options.timeout_s)
    try:
        stream = served.engine.submit(job)
    except QueueFull as exc:
        raise ApiError(429, f"{exc.message}; {exc.hint}", code="queue_full") from None
    except TunesmithError as exc:  # the adapter was unloaded in between
        raise ApiError(404, exc.message, "model", "model_not_found") from None
    row = start_row(request, run=served.adapters.get(body.model, str(served.run)))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(app, request, body.model, stream, row, chat, include_usage),
                                 media_type="text/event-stream", headers={"X-Request-Id": row["id"]})
    times = await run_in_threadpool(_drain, stream)
    return _answer(app, request, body.model, stream, row, chat, "".join(_trimmed(stream.text)), times)


def _token_budget(served, options, prompt_tokens: int, asked: int | None) -> int:
    """New tokens this request may generate: what it asked (at most the server's cap), within the model's context."""
    if asked is not None and asked > options.max_tokens:
        raise ApiError(400, f"max_tokens {asked} is over this server's limit of {options.max_tokens}", "max_tokens")
    wanted = asked or options.max_tokens
    context = served.context_len
    if context is None:
        return wanted
    if prompt_tokens + (asked or 1) > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the messages, {asked or 1} in "
                       "the completion). Please reduce the length of the messages or completion.", "messages")
    return min(wanted, context - prompt_tokens)


def _drain(stream) -> list[float]:
    """Wait for the whole answer; the time of each piece of text (for the inter-token latencies)."""
    return [time.monotonic() for _ in stream]


def _trimmed(pieces):
    """The pieces of an answer without its leading and trailing white space (as `tunesmith generate` strips it);
    trailing white space is held back until text follows it."""
    pieces = [pieces] if isinstance(pieces, str) else pieces
    started, held = False, ""
    for piece in pieces:
        text = held + piece
        if not started:
            text = text.lstrip()
            started = bool(text)
        body = text.rstrip()
        held = text[len(body):]
        if body:
            yield body


def _timing(request: Request, stream, times: list[float]) -> Timing:
    start = request.state.received
    queue = stream.started_at - stream.queued_at if stream.started_at else None
    ttft = stream.first_token_at - start if stream.first_token_at else None
    gaps = tuple(b - a for a, b in zip(times, times[1:]))
    return Timing(queue, ttft, (stream.finished_at or time.monotonic()) - start, gaps)


def _failure(stream) -> ApiError | None:
    if stream.finish_reason == "timeout":
        return ApiError(408, f"the answer took longer than this server's --timeout ({stream.request.timeout_s}s)",
                        code="timeout")
    if stream.finish_reason == "error":
        return ApiError(500, f"generation failed: {stream.error}", code="internal_error")
    return None


def _log_answer(app: FastAPI, request: Request, model: str, stream, row: dict, text: str, times: list[float],
                status: int = 200, error_code: str | None = None) -> None:
    timing = _timing(request, stream, times)
    if status == 200:
        app.state.metrics.answered(metric_name(app, model), stream.finish_reason, stream.prompt_tokens,
                                   stream.completion_tokens, timing)
    record(app, {**row, "status": status, "error_code": error_code, "finish_reason": stream.finish_reason,
                  "queue_s": timing.queue_s, "ttft_s": timing.ttft_s, "e2e_s": timing.e2e_s,
                  "prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
                  "answer": text})


def _usage(stream) -> dict[str, int]:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}


def _answer(app, request, model, stream, row, chat: bool, text: str, times: list[float]) -> JSONResponse:
    failure = _failure(stream)
    if failure is not None:  # logged with its times and tokens, then answered as an error
        _log_answer(app, request, model, stream, row, text, times, failure.status, failure.code)
        return JSONResponse(error_body(failure.status, failure.message, code=failure.code),
                            status_code=failure.status, headers={"X-Request-Id": row["id"]})
    _log_answer(app, request, model, stream, row, text, times)
    choice = {"index": 0, "finish_reason": stream.finish_reason, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return JSONResponse({"id": row["id"], "object": "chat.completion" if chat else "text_completion",
                         "created": int(row["time"]), "model": model, "choices": [choice], "usage": _usage(stream)},
                        headers={"X-Request-Id": row["id"]})


async def _events(app, request, model: str, stream, row: dict, chat: bool, include_usage: bool):
    """Server-sent events: one chunk per piece of text, a last chunk with the finish reason, `data: [DONE]`."""
    head = {"id": row["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(row["time"]), "model": model}

    def chunk(text: str | None, finish: str | None = None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": text or ""} if first else
                     {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**head, 'choices': [choice]}, ensure_ascii=False)}\n\n"

    times: list[float] = []
    pieces: list[str] = []
    finished = False
    try:
        if chat:
            yield chunk("", first=True)
        async for piece in iterate_in_threadpool(_timed(_trimmed(e.text for e in stream), times)):
            pieces.append(piece)
            yield chunk(piece)
        failure = _failure(stream)
        if failure is not None:
            _log_answer(app, request, model, stream, row, "".join(pieces), times, failure.status, failure.code)
            yield f"data: {json.dumps(error_body(failure.status, failure.message, code=failure.code))}\n\n"
        else:
            _log_answer(app, request, model, stream, row, "".join(pieces), times)
            yield chunk(None, stream.finish_reason)
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(stream)})}\n\n"
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away
            stream.cancel()
            stream.finish_reason = stream.finish_reason or "cancelled"
            _log_answer(app, request, model, stream, row, "".join(pieces), times, 499, "client_closed")


def _timed(pieces, times: list[float]):
    for piece in pieces:
        times.append(time.monotonic())
        yield piece
