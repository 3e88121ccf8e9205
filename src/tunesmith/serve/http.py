"""Request bookkeeping shared by the routes of `tunesmith serve`: OpenAI's error JSON, the request's log row, and
recording it in the request log and the metrics."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("tunesmith.serve")

ENDPOINTS = {"/v1/chat/completions": ("chat.completions", "chatcmpl"), "/v1/completions": ("completions", "cmpl"),
             "/v1/classify": ("classify", "clf"), "/v1/score": ("score", "score")}
VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "value_error", "literal_error",
                "too_short", "too_long", "finite_number", "json_invalid", "enum"}  # 400; other schema errors 422
UNION_TAG = re.compile(r"^(str|int|float|bool|[\w-]+\[.*\])$")  # pydantic's name for a branch of a Union
STATUS_CODES = {400: "invalid_value", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                408: "timeout", 413: "request_too_large", 422: "invalid_schema", 429: "queue_full"}


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


# ----------------------------------------------------------------------------------------------- the log row

def record(app: FastAPI, row: dict[str, Any]) -> None:
    """One row in the request log and the metrics (an error counted by status)."""
    if row.get("status", 200) >= 400:
        app.state.metrics.failed(metric_name(app, row.get("model")), row["status"])
    try:
        app.state.log.record(row)
    except Exception:  # noqa: BLE001 — a full disk must not turn an answer into an error
        log.exception("request log: could not record %s", row.get("id"))


def metric_name(app: FastAPI, model: str | None) -> str:
    """The `model_name` label: the model asked for when it is served, else the served run's (a client can't grow
    the label set)."""
    served = app.state.served
    return model if model == served.name or model in served.adapters else served.name


def start_row(request: Request, model: str | None = None, **row) -> dict[str, Any]:
    """The request's log row so far (kept on request.state for the error handlers)."""
    endpoint, prefix = ENDPOINTS.get(request.url.path, (request.url.path.removeprefix("/v1/"), "req"))
    state = request.state
    if not hasattr(state, "row"):
        state.row = {"id": f"{prefix}-{uuid.uuid4().hex}", "time": time.time(), "endpoint": endpoint}
        state.received = time.monotonic()
    state.row.update({"model": model, **row} if model is not None else row)
    return state.row


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error JSON with `status`; a request to /v1/… is recorded with it."""
    row = start_row(request)
    if request.url.path.startswith("/v1/"):
        record(request.app, {**row, "status": status, "error_code": code or STATUS_CODES.get(status, "error"),
                             "e2e_s": time.monotonic() - request.state.received})
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers={"X-Request-Id": row["id"]})
