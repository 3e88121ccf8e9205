"""The OpenAI-compatible HTTP face of `tunesmith serve` (FastAPI): chat and text completions through the batching
engine, labels from classifier runs, scores from reward runs, vLLM's adapter endpoints, feedback, health, metrics.

Every request to /v1/… is recorded in the request log and counted in the metrics, refused ones included. Every bad
request gets OpenAI's error JSON with its 4xx status; a bug is logged on the server and answered with a 500 JSON,
never a traceback (http.py keeps the error JSON and the log rows, completions.py the generation). Read top to
bottom: what is served, the app, its error handlers and gate, its routes.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tunesmith.errors import TunesmithError
from tunesmith.serve import schemas
from tunesmith.serve.completions import generate_answer
from tunesmith.serve.http import (UNION_TAG, VALUE_ERRORS, ApiError, error_body, error_response, log, record,
                                  start_row)
from tunesmith.serve.metrics import CONTENT_TYPE, Metrics


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


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors() or [{"loc": (), "msg": "invalid body", "type": "value_error"}]
        fields = [".".join(str(p) for p in e.get("loc", ()) if p != "body" and not UNION_TAG.match(str(p))) or None
                  for e in errors]
        status = 400 if all(e.get("type") in VALUE_ERRORS for e in errors) else 422  # bad values; else bad shape
        message = "; ".join(f"{f}: {e.get('msg')}" if f else str(e.get("msg")) for f, e in zip(fields, errors))
        return error_response(request, status, message, fields[0])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(request, exc.status_code, message)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal error (logged on the server)", code="internal_error")


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
        response = error_response(request, status, message)
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
        start_row(request, body.model, input_chars=sum(len(m["content"]) for m in messages if m["role"] == "user"),
               prompt=messages)
        if messages[-1]["role"] == "assistant":
            raise ApiError(400, "messages: the conversation ends with an assistant turn; end it with the user's",
                           "messages")
        adapter = _generator(app, body.model)
        from tunesmith.generate import prompt_ids

        ids = prompt_ids(served.loaded, messages)
        return await generate_answer(app, request, body, ids, adapter, chat=True,
                               max_tokens=body.max_completion_tokens or body.max_tokens)

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request):
        start_row(request, body.model, input_chars=len(body.prompt), prompt=body.prompt)
        adapter = _generator(app, body.model)
        ids = served.loaded.tokenizer(body.prompt)["input_ids"]
        return await generate_answer(app, request, body, ids, adapter, chat=False, max_tokens=body.max_tokens)

    @app.post("/v1/classify")
    async def classify(body: schemas.ClassifyRequest, request: Request):
        from tunesmith.predict import ranked

        start_row(request, body.model, input_chars=sum(map(len, body.input)), prompt=body.input)
        _model_of_kind(app, body.model, "classify")
        probabilities = await run_in_threadpool(_locked, served, _quietly(served.predict), served.run, body.input)
        answers = [ranked(p, len(p)) for p in probabilities]
        row = start_row(request, prediction=[{"label": a["label"], "probability": a["probability"]} for a in answers])
        data = [{"index": i, "label": a["label"], "probability": a["probability"], "probs": p}
                for i, (a, p) in enumerate(zip(answers, probabilities))]
        return _finish_row(app, request, row, {"id": row["id"], "object": "list", "created": int(row["time"]),
                                               "model": body.model, "data": data})

    @app.post("/v1/score")
    async def score(body: schemas.ScoreRequest, request: Request):
        conversation = body.conversation()
        start_row(request, body.model, input_chars=sum(len(m["content"]) for m in conversation if m["role"] == "user"))
        _model_of_kind(app, body.model, "score")
        if bool(body.prompt) == bool(body.messages):
            raise ApiError(400, "give the prompt either as `prompt` (text) or as `messages`, one of the two",
                           "prompt")
        scores = await run_in_threadpool(_locked, served, served.reward.score, [conversation] * len(body.responses),
                                         body.responses)
        row = start_row(request, prompt=conversation)
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
        start_row(request, body.lora_name)
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
        start_row(request, body.lora_name)
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
    record(app, {**row, "status": 200, "e2e_s": time.monotonic() - request.state.received})
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
