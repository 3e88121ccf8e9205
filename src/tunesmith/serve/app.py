"""The OpenAI-compatible HTTP face of `tunesmith serve` (FastAPI): chat and text completions through the batching
engine, labels from classifier runs, scores from reward runs, vLLM's adapter endpoints, feedback, health, metrics.

Every request to /v1/… is recorded in the request log and counted in the metrics, refused ones included. Every bad
request gets OpenAI's error JSON with its 4xx status; a bug is logged on the server and answered with a 500 JSON,
never a traceback. Read top to bottom: errors, what is served, the app, its routes, the generation helpers.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException

from tunesmith.errors import TunesmithError
from tunesmith.serve import schemas
from tunesmith.serve.metrics import CONTENT_TYPE, Metrics, Timing

log = logging.getLogger("tunesmith.serve")

ENDPOINTS = {"/v1/chat/completions": ("chat.completions", "chatcmpl"), "/v1/completions": ("completions", "cmpl"),
             "/v1/classify": ("classify", "clf"), "/v1/score": ("score", "score")}
VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "value_error", "literal_error",
                "too_short", "too_long", "finite_number", "json_invalid", "enum"}  # 400; other schema errors 422
UNION_TAG = re.compile(r"^(str|int|float|bool|[\w-]+\[.*\])$")  # pydantic's name for a branch of a Union
STATUS_CODES = {400: "invalid_value", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                408: "timeout", 413: "request_too_large", 422: "invalid_schema", 429: "queue_full"}


# ----------------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    """A request answered with OpenAI's error JSON and a status code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or STATUS_CODES.get(status, "error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": code or STATUS_CODES.get(status, "error")}}


# ----------------------------------------------------------------------------------------------- what is served

@dataclass
class ServeOptions:
    """Limits and switches of one server (the `tunesmith serve` flags)."""

    max_tokens: int = 1024  # new tokens one request may ask for
    max_body: int = 1 << 20  # bytes of a request body
    timeout_s: float | None = None  # per generation request
    api_key: str | None = None  # Authorization: Bearer KEY on /v1/… when set


@dataclass
class Served:
    """The run being served and how it answers: `engine` (a text generator), `predict` (a classifier) or
    `reward` (a reward model); `adapters` maps adapter names to their run folders."""

    name: str
    run: Path
    kind: str  # generate | classify | score
    loaded: Any = None
    engine: Any = None
    predict: Any = None
    reward: Any = None
    adapters: dict[str, str] = field(default_factory=dict)
    context_len: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one classifier / reward batch at a time


# ----------------------------------------------------------------------------------------------- the app

def create_app(served: Served, request_log, options: ServeOptions | None = None,
               metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app answering for `served`; `request_log` is a requestlog.RequestLog. Ready once
    `app.state.ready` is set (after the parity check)."""
    options = options or ServeOptions()
    app = FastAPI(title="tunesmith serve", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_threads_for(served))
    app.state.served, app.state.log, app.state.options = served, request_log, options
    app.state.metrics = metrics or Metrics()
    app.state.ready = False
    _handlers(app)
    _routes(app)
    app.add_middleware(_Gate, app_ref=app)
    return app


def _threads_for(served: Served):
    """A lifespan giving the thread pool room for every request the engine holds (each waits for its answer in a
    thread), beside the requests that do not generate."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        import anyio.to_thread

        engine = served.engine
        if engine is not None:
            limiter = anyio.to_thread.current_default_thread_limiter()
            limiter.total_tokens = max(limiter.total_tokens, engine.max_batch + engine.max_waiting + 16)
        yield

    return lifespan


def _record(app: FastAPI, row: dict[str, Any]) -> None:
    """One row in the request log and the metrics (an error counted by status)."""
    if row.get("status", 200) >= 400:
        app.state.metrics.failed(_metric_name(app, row.get("model")), row["status"])
    try:
        app.state.log.record(row)
    except Exception:  # noqa: BLE001 — a full disk must not turn an answer into an error
        log.exception("request log: could not record %s", row.get("id"))


def _metric_name(app: FastAPI, model: str | None) -> str:
    served = app.state.served
    return model if model == served.name or model in served.adapters else served.name


def _start(request: Request, model: str | None = None, **row) -> dict[str, Any]:
    """The request's log row so far (kept on request.state for the error handlers)."""
    endpoint, prefix = ENDPOINTS.get(request.url.path, (request.url.path.removeprefix("/v1/"), "req"))
    state = request.state
    if not hasattr(state, "row"):
        state.row = {"id": f"{prefix}-{uuid.uuid4().hex}", "time": time.time(), "endpoint": endpoint}
        state.received = time.monotonic()
    state.row.update({"model": model, **row} if model is not None else row)
    return state.row


def _error_response(request: Request, status: int, message: str, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    row = _start(request)
    if request.url.path.startswith("/v1/"):
        _record(request.app, {**row, "status": status, "error_code": code or STATUS_CODES.get(status, "error"),
                              "e2e_s": time.monotonic() - request.state.received})
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers={"X-Request-Id": row["id"]})


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(request, exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors() or [{"loc": (), "msg": "invalid body", "type": "value_error"}]
        fields = [".".join(str(p) for p in e.get("loc", ()) if p != "body" and not UNION_TAG.match(str(p))) or None
                  for e in errors]
        status = 400 if all(e.get("type") in VALUE_ERRORS for e in errors) else 422  # bad values; else bad shape
        message = "; ".join(f"{f}: {e.get('msg')}" if f else str(e.get("msg")) for f, e in zip(fields, errors))
        return _error_response(request, status, message, fields[0])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return _error_response(request, exc.status_code, message)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return _error_response(request, 500, "internal error (logged on the server)", code="internal_error")


class _Gate:
    """ASGI middleware in front of every route: the API key on /v1/… (constant-time compare) and the body size
    (Content-Length, or counted as it arrives), before the body is parsed."""

    def __init__(self, app, app_ref: FastAPI):
        self.inner, self.app = app, app_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        refusal = self._refusal(scope)
        body = None
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, refusal = await self._read_body(receive)
            if body is None and refusal is None:
                return  # the client went away
        if refusal is not None:
            return await self._refuse(scope, receive, send, *refusal)
        return await self.inner(scope, _replay(body, receive) if body is not None else receive, send)

    def _refusal(self, scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.app.state.options.api_key
        if key and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return 401, ("missing API key: send `Authorization: Bearer KEY`" if not given
                             else "incorrect API key")
        length = headers.get("content-length")
        limit = self.app.state.options.max_body
        if length is not None and (not length.isdigit() or int(length) > limit):
            return 413, f"request body over {limit} bytes"
        return None

    async def _read_body(self, receive) -> tuple[bytes | None, tuple[int, str] | None]:
        chunks, total, limit = [], 0, self.app.state.options.max_body
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return b"", (413, f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks), None

    async def _refuse(self, scope, receive, send, status: int, message: str) -> None:
        request = Request(scope, receive)
        request.scope.setdefault("app", self.app)
        response = _error_response(request, status, message)
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        if status == 413:
            response.headers["Connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body already read, then the client's own messages."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


# ----------------------------------------------------------------------------------------------- routes

def _routes(app: FastAPI) -> None:
    served: Served = app.state.served

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not app.state.ready:
            return JSONResponse(error_body(503, "not ready: the parity check has not passed yet",
                                           code="not_ready"), status_code=503)
        return {"status": "ready", "model": served.name}

    @app.get("/metrics")
    async def metrics():
        if served.engine is not None:
            app.state.metrics.set_load(served.name, served.engine.running, served.engine.waiting)
        return Response(app.state.metrics.scrape(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        cards = [{"id": served.name, "object": "model", "created": created, "owned_by": "tunesmith",
                  "root": str(served.run), "parent": None, "max_model_len": served.context_len}]
        cards += [{"id": name, "object": "model", "created": created, "owned_by": "tunesmith", "root": path,
                   "parent": served.name, "max_model_len": served.context_len}
                  for name, path in sorted(served.adapters.items())]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat(body: schemas.ChatRequest, request: Request):
        messages = [m.as_dict() for m in body.messages]
        _start(request, body.model, input_chars=sum(len(m["content"]) for m in messages if m["role"] == "user"),
               prompt=messages)
        if messages[-1]["role"] == "assistant":
            raise ApiError(400, "messages: the conversation ends with an assistant turn; end it with the user's",
                           "messages")
        adapter = _generator(app, body.model)
        from tunesmith.generate import prompt_ids

        ids = prompt_ids(served.loaded, messages)
        return await _generate(app, request, body, ids, adapter, chat=True,
                               max_tokens=body.max_completion_tokens or body.max_tokens)

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request):
        _start(request, body.model, input_chars=len(body.prompt), prompt=body.prompt)
        adapter = _generator(app, body.model)
        ids = served.loaded.tokenizer(body.prompt)["input_ids"]
        return await _generate(app, request, body, ids, adapter, chat=False, max_tokens=body.max_tokens)

    @app.post("/v1/classify")
    async def classify(body: schemas.ClassifyRequest, request: Request):
        from tunesmith.predict import ranked

        _start(request, body.model, input_chars=sum(map(len, body.input)), prompt=body.input)
        _model_of_kind(app, body.model, "classify")
        probabilities = await run_in_threadpool(_locked, served, _quietly(served.predict), served.run, body.input)
        answers = [ranked(p, len(p)) for p in probabilities]
        row = _start(request, prediction=[{"label": a["label"], "probability": a["probability"]} for a in answers])
        data = [{"index": i, "label": a["label"], "probability": a["probability"], "probs": p}
                for i, (a, p) in enumerate(zip(answers, probabilities))]
        return _finish_row(app, request, row, {"id": row["id"], "object": "list", "created": int(row["time"]),
                                               "model": body.model, "data": data})

    @app.post("/v1/score")
    async def score(body: schemas.ScoreRequest, request: Request):
        conversation = body.conversation()
        _start(request, body.model, input_chars=sum(len(m["content"]) for m in conversation if m["role"] == "user"))
        _model_of_kind(app, body.model, "score")
        if bool(body.prompt) == bool(body.messages):
            raise ApiError(400, "give the prompt either as `prompt` (text) or as `messages`, one of the two",
                           "prompt")
        scores = await run_in_threadpool(_locked, served, served.reward.score, [conversation] * len(body.responses),
                                         body.responses)
        row = _start(request, prompt=conversation)
        return _finish_row(app, request, row, {"id": row["id"], "object": "list", "created": int(row["time"]),
                                               "model": body.model,
                                               "data": [{"index": i, "score": s} for i, s in enumerate(scores)]})

    @app.post("/v1/feedback")
    async def feedback(body: schemas.FeedbackRequest, request: Request):
        if not await run_in_threadpool(app.state.log.feedback, body.request_id, body.rating, body.correction):
            raise ApiError(404, f"request_id {body.request_id!r}: no such request in the log", "request_id")
        return {"object": "feedback", "request_id": body.request_id, "rating": body.rating, "recorded": True}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: schemas.LoadAdapterRequest, request: Request):
        _start(request, body.lora_name)
        if served.engine is None:
            raise ApiError(400, f"{served.name} is a {served.kind} run: adapters load onto a text generator")
        if body.lora_name == served.name or body.lora_name in served.adapters:
            raise ApiError(400, f"The lora adapter '{body.lora_name}' has already been loaded.", "lora_name")
        if not Path(body.lora_path).expanduser().is_dir():
            raise ApiError(404, f"No adapter found at {body.lora_path}", "lora_path")
        await run_in_threadpool(_tunesmith_call, served.engine.load_adapter, body.lora_name, body.lora_path)
        served.adapters[body.lora_name] = str(Path(body.lora_path).expanduser())
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: schemas.UnloadAdapterRequest, request: Request):
        _start(request, body.lora_name)
        if body.lora_name not in served.adapters:
            raise ApiError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "lora_name")
        served.adapters.pop(body.lora_name)  # new requests naming it get 404 from here on
        await run_in_threadpool(_tunesmith_call, served.engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _locked(served: Served, fn, *args):
    with served.lock:
        return fn(*args)


def _quietly(predict):
    """A run's `predict` without its progress bar (one per request would fill the server's terminal)."""
    return lambda run, texts: predict(run, texts, progress=lambda n: None)


def _tunesmith_call(fn, *args):
    """`fn(*args)`; a TunesmithError (a wrong run folder, another base model) becomes a 400 with its hint."""
    try:
        return fn(*args)
    except TunesmithError as exc:
        raise ApiError(400, exc.message + (f" ({exc.hint})" if exc.hint else "")) from None


def _finish_row(app: FastAPI, request: Request, row: dict, answer: dict) -> JSONResponse:
    _record(app, {**row, "status": 200, "e2e_s": time.monotonic() - request.state.received})
    return JSONResponse(answer, headers={"X-Request-Id": row["id"]})


def _model_of_kind(app: FastAPI, model: str, kind: str) -> None:
    """A 404 for a model not served, a 400 for one that answers another way."""
    served = app.state.served
    if model != served.name and model not in served.adapters:
        raise ApiError(404, f"The model `{model}` does not exist (served: {', '.join(_names(served))})", "model",
                       "model_not_found")
    if served.kind != kind:
        route = {"generate": "/v1/chat/completions", "classify": "/v1/classify", "score": "/v1/score"}[served.kind]
        raise ApiError(400, f"`{model}` is a {served.kind} run: send its requests to POST {route}", "model")


def _generator(app: FastAPI, model: str) -> str | None:
    """The engine adapter answering for `model` (None: the served run itself)."""
    _model_of_kind(app, model, "generate")
    return None if model == app.state.served.name else model


def _names(served: Served) -> list[str]:
    return [served.name, *sorted(served.adapters)]


# ----------------------------------------------------------------------------------------------- generation

async def _generate(app: FastAPI, request: Request, body: schemas.Sampling, ids: list[int], adapter: str | None,
                    chat: bool, max_tokens: int | None):
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
    row = _start(request, run=served.adapters.get(body.model, str(served.run)))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(app, request, body.model, stream, row, chat, include_usage),
                                 media_type="text/event-stream", headers={"X-Request-Id": row["id"]})
    times = await run_in_threadpool(_drain, stream)
    return _answer(app, request, body.model, stream, row, chat, "".join(_trimmed(stream.text)), times)


def _token_budget(served: Served, options: ServeOptions, prompt_tokens: int, asked: int | None) -> int:
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
        app.state.metrics.answered(_metric_name(app, model), stream.finish_reason, stream.prompt_tokens,
                                   stream.completion_tokens, timing)
    _record(app, {**row, "status": status, "error_code": error_code, "finish_reason": stream.finish_reason,
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
