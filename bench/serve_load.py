"""Serving under load: N concurrent streaming clients (the real `openai` package) against `tunesmith serve` and, in
the same run, against a plain server that calls `model.generate` once per request (one request at a time, the way
a tutorial FastAPI endpoint does it), both serving the same run on 127.0.0.1.

For each server it prints requests/s, output tokens/s, p50/p95/p99 time to first token and end-to-end latency,
errors, the server's peak RSS, and how many greedy answers equal `tunesmith generate`'s for the same prompts (each
prompt answered alone, as `tunesmith generate RUN --prompt …` does). Prompts are the run's own validation rows
(then its training rows). Bounded: `--requests` requests per server, and no new request after `--deadline` seconds.

    .venv/bin/python bench/serve_load.py [--run runs/demo] [--clients 16] [--requests 32] [--max-tokens 32]
                                         [--servers tunesmith,plain] [--deadline 600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request  # at module level: the plain server's handler annotation is resolved from here

HOST = "127.0.0.1"


@dataclass
class Outcome:
    """One request as the client saw it."""

    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None


@dataclass
class Load:
    """All requests against one server."""

    server: str
    wall: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    peak_rss_gb: float = 0.0
    identical: int = 0


# ----------------------------------------------------------------------------------------------- prompts

def run_prompts(run: Path, n: int) -> list[list[dict[str, str]]]:
    """The first n prompts (chat messages) of the run's validation rows, then its training rows."""
    from tunesmith.data.format import prompt_messages
    from tunesmith.data.snapshot import read_snapshot

    snap = read_snapshot(run)
    prompts = [prompt_messages(r) for r in [*snap.validation, *snap.train]]
    if len(prompts) < n:
        raise SystemExit(f"{run} records {len(prompts)} rows, {n} requests asked for")
    return prompts[:n]


def reference_answers(run: Path, prompts, max_tokens: int) -> list[str]:
    """`tunesmith generate`'s greedy answer to each prompt alone."""
    from tunesmith.generate import generate, load_run

    loaded = load_run(run)
    return [generate(loaded, [p], max_new_tokens=max_tokens, batch_size=1)[0] for p in prompts]


# ----------------------------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(kind: str, run: Path, port: int, clients: int, folder: Path) -> subprocess.Popen:
    """`tunesmith serve` (its start-up parity check included) or this file's plain server, as a child process."""
    if kind == "tunesmith":
        argv = [sys.executable, "-m", "tunesmith", "serve", str(run), "--host", HOST, "--port", str(port),
                "--max-batch", str(clients), "--max-waiting", str(4 * clients), "--log", str(folder / "log.sqlite")]
    else:
        argv = [sys.executable, __file__, "--plain-server", "--run", str(run), "--port", str(port)]
    return subprocess.Popen(argv, stdout=open(folder / f"{kind}.out", "w"), stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, port: int, limit: float = 600) -> None:
    import httpx

    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"http://{HOST}:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {limit:.0f}s")


def peak_rss_gb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in GB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return 0.0


def plain_server(run: Path, port: int) -> None:
    """An OpenAI-style chat endpoint the tutorial way: one `model.generate` per request, one request at a time,
    text streamed with transformers' TextIteratorStreamer."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import TextIteratorStreamer

    from tunesmith.generate import load_run, prompt_ids

    loaded, lock, app = load_run(run), threading.Lock(), FastAPI()
    name = run.name

    @app.get("/ready")
    def ready():
        return {"status": "ready"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        ids = torch.tensor([prompt_ids(loaded, body["messages"])])
        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        done, finished = {}, threading.Event()

        def work():
            try:
                with lock, torch.inference_mode():
                    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                                generation_config=loaded.generation_config, do_sample=False,
                                                max_new_tokens=body.get("max_tokens") or 32)
                done["tokens"] = out.shape[1] - ids.shape[1]
            finally:
                finished.set()

        threading.Thread(target=work, daemon=True).start()

        def events():
            def chunk(delta, finish=None, usage=None):
                return "data: " + json.dumps({"id": "plain", "object": "chat.completion.chunk", "created": 0,
                                              "model": name, "usage": usage, "choices": [] if usage else [
                                                  {"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"
            for text in streamer:
                if text:
                    yield chunk({"content": text})
            finished.wait()
            yield chunk({}, "stop")
            yield chunk({}, usage={"prompt_tokens": ids.shape[1], "completion_tokens": done.get("tokens", 0),
                                   "total_tokens": ids.shape[1] + done.get("tokens", 0)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


# ----------------------------------------------------------------------------------------------- clients

def one_request(client, model: str, messages, max_tokens: int) -> Outcome:
    """One streamed chat completion, timed from the client's side."""
    import openai

    start, got = time.perf_counter(), Outcome()
    try:
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        pieces = []
        for chunk in stream:
            if chunk.usage is not None:
                got.tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    got.ttft = got.ttft if got.ttft is not None else time.perf_counter() - start
                    pieces.append(choice.delta.content)
        got.text, got.e2e = "".join(pieces), time.perf_counter() - start
    except openai.APIError as exc:
        got.error = type(exc).__name__
    return got


def load_server(kind: str, port: int, prompts, clients: int, max_tokens: int, deadline: float) -> Load:
    """Send every prompt, `clients` at a time, as streaming requests; none is started after `deadline` seconds."""
    import openai

    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="not-needed", max_retries=0, timeout=600)
    model = client.models.list().data[0].id if kind == "tunesmith" else "plain"
    load, stop_at = Load(kind), time.monotonic() + deadline

    def task(messages):
        if time.monotonic() > stop_at:
            return Outcome(error="deadline")
        return one_request(client, model, messages, max_tokens)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        load.outcomes = list(pool.map(task, prompts))
    load.wall = time.perf_counter() - start
    return load


# ----------------------------------------------------------------------------------------------- report

def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return " / ".join(f"{cuts[p - 1]:.2f}" for p in (50, 95, 99))


def table(loads: list[Load]) -> str:
    rows = ["| server | answered | req/s | output tok/s | TTFT p50 / p95 / p99 s | e2e p50 / p95 / p99 s | errors "
            "| peak RSS GB | greedy = `tunesmith generate` | ratio (tok/s) |", "|" + "---|" * 10]
    base = next((x for x in loads if x.server == "plain"), None)
    for x in loads:
        sent = [o for o in x.outcomes if o.error != "deadline"]
        ok = [o for o in sent if o.error is None]
        tps = sum(o.tokens for o in ok) / x.wall
        base_tps = sum(o.tokens for o in base.outcomes if o.error is None) / base.wall if base else 0
        ratio = f"{tps / base_tps:.2f}×" if base_tps else "-"
        rows.append(f"| {x.server} | {len(ok)} | {len(ok) / x.wall:.2f} | {tps:.1f} | "
                    f"{percentiles([o.ttft for o in ok if o.ttft is not None])} | "
                    f"{percentiles([o.e2e for o in ok])} | {len(sent) - len(ok)} | {x.peak_rss_gb:.2f} | "
                    f"{x.identical}/{len(sent)} | {ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "demo")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=32, help="requests per server (distinct prompts)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--servers", default="tunesmith,plain", help="which servers, in order")
    parser.add_argument("--deadline", type=float, default=600, help="seconds after which no request is started")
    parser.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_server:
        plain_server(args.run, args.port)
        return 0
    prompts = run_prompts(args.run, args.requests)
    print(f"{args.requests} prompts from {args.run}; reference answers (tunesmith generate, one prompt at a time)…")
    reference = reference_answers(args.run, prompts, args.max_tokens)
    loads = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        for kind in args.servers.split(","):
            port = free_port()
            proc = start_server(kind, args.run, port, args.clients, Path(tmp))
            try:
                wait_ready(proc, port)
                print(f"{kind}: ready on port {port}; {args.clients} clients…")
                load = load_server(kind, port, prompts, args.clients, args.max_tokens, args.deadline)
                load.peak_rss_gb = peak_rss_gb(proc.pid)
                load.identical = sum(o.error is None and o.text.strip() == r for o, r in zip(load.outcomes, reference))
                loads.append(load)
            finally:
                proc.terminate()
                proc.wait(30)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; run {args.run}; "
          f"{args.clients} clients, {args.requests} requests, max_tokens {args.max_tokens}, greedy\n")
    print(table(loads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
