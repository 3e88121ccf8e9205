"""Starting `tunesmith serve`: check the flags, bind the port, load what the run answers with, check parity, and run
uvicorn; and `--print-vllm`, the equivalent `vllm serve` command written beside the run.

Everything that can be refused (a non-loopback host without a key, a bad --adapter, a port in use) is refused
before a model is loaded.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunesmith.errors import RunError, TunesmithError

ADAPTER_NAME = "a name of letters, digits, '.', '_' or '-'"


@dataclass
class ServeConfig:
    """What `tunesmith serve` was asked for (its flags, checked)."""

    run: Path
    adapters: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_waiting: int = 64
    max_batch: int = 16
    max_tokens: int = 1024
    timeout_s: float | None = None
    log: Path | None = None
    log_content: bool = False
    parity: bool = True


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`NAME=RUN` specs as {name: run folder}; a TunesmithError naming the bad one."""
    import re

    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, run = spec.partition("=")
        if not sep or not run or not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name):
            raise TunesmithError(f"--adapter {spec!r}: expected NAME=RUN with NAME {ADAPTER_NAME}",
                                 "e.g. --adapter support=runs/support-lora")
        if name in adapters:
            raise TunesmithError(f"--adapter {spec!r}: the name {name!r} is given twice", "give each adapter its own "
                                 "name")
        adapters[name] = str(Path(run).expanduser())
    return adapters


def api_key(host: str, env: str | None) -> str | None:
    """The API key from environment variable `env`; refused: a non-loopback host without one, or an unset or empty
    variable."""
    key = key_from_env(env)
    if key is None and not is_loopback(host):
        raise TunesmithError(f"--host {host}: not a loopback address, and no API key: anyone who can reach the "
                             "port could use the model", "add --api-key-env VAR (clients send `Authorization: Bearer "
                             "$VAR`), or serve on --host 127.0.0.1")
    return key


def key_from_env(env: str | None) -> str | None:
    """The key held by environment variable `env` (None without one); an unset or empty variable is an error."""
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise TunesmithError(f"--api-key-env {env}: the environment variable {env} is not set or empty",
                             f"export {env}=… (a long random key) first")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, made before anything loads; a TunesmithError when it can't be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TunesmithError(f"--host {host} --port {port}: can't listen there ({exc.strerror or exc})",
                             "choose another --port (0 = any free port), or stop what holds this one") from None
    sock.listen(2048)
    return sock


def run_kind(run_path: str | Path) -> str:
    """generate | classify | score: how the run answers."""
    from tunesmith.artifacts import open_run
    from tunesmith.methods import REGISTRY

    method = REGISTRY.get(open_run(run_path).read_manifest().get("method", ""))
    if method is not None and method.scores_replies:
        return "score"
    if method is not None and method.predict is not None:
        return "classify"
    return "generate"


def load_served(config: ServeConfig, echo: Callable[[str], None] = print):
    """The app's Served: the run's engine (its adapters loaded beside it), classifier, or reward model."""
    from tunesmith.artifacts import open_run
    from tunesmith.serve.app import Served

    run = open_run(config.run)
    kind = run_kind(run.root)
    served = Served(run.root.name, run.root, kind)
    if kind != "generate" and config.adapters:
        raise TunesmithError(f"--adapter: {run.root} is a {kind} run; adapters are served beside a text generator",
                             "leave --adapter out")
    if kind == "classify":
        from tunesmith.predict import classifier_predict

        served.predict = classifier_predict(run.root)
        served.predict(run.root, ["warm-up"])  # loads (and caches) the classifier now, not on the first request
    elif kind == "score":
        from tunesmith.methods.reward import load_reward_model

        served.reward = load_reward_model(run.root)
    else:
        from tunesmith.generate import load_run
        from tunesmith.serve.engine import Engine

        served.loaded = load_run(run.root)
        served.context_len = getattr(served.loaded.model.config, "max_position_embeddings", None)
        served.engine = Engine(served.loaded, max_batch=config.max_batch, max_waiting=config.max_waiting).start()
        for name, path in config.adapters.items():
            if name == served.name:
                raise TunesmithError(f"--adapter {name}={path}: {name!r} is the served run's own name",
                                     "give the adapter another name")
            served.engine.load_adapter(name, path)
            served.adapters[name] = str(Path(path).resolve())
            echo(f"adapter {name}: {path}")
    return served


def check_served_parity(served, echo: Callable[[str], None] = print) -> None:
    """The engine against each run's generation path on that run's validation prompts — the served run, then each
    adapter (its run loaded on its own for the comparison, then let go); a RunError at the first that differs."""
    import gc

    from tunesmith.generate import load_run
    from tunesmith.serve.parity import check_parity, engine_answer, parity_prompts, require

    if served.kind != "generate":
        echo(f"parity: a {served.kind} run answers through the same function as `tunesmith "
             f"{'predict' if served.kind == 'classify' else 'score'}` (nothing to compare)")
        return
    for name, run in [(served.name, served.run), *served.adapters.items()]:
        prompts = parity_prompts(run)
        if not prompts:
            echo(f"parity: {run} holds no validation prompts answered in text; {name} not checked")
            continue
        adapter = None if name == served.name else name
        reference = served.loaded if adapter is None else load_run(run)
        result = check_parity(reference, engine_answer(served.engine, served.loaded, adapter=adapter), prompts,
                              f"engine serving {name}")
        del reference
        gc.collect()
        require(result)  # the differences, as the error
        echo(result.describe())


def serve(config: ServeConfig, echo: Callable[[str], None] = print) -> int:
    """Bind, load, check parity, then answer until interrupted."""
    import uvicorn

    from tunesmith.serve.app import ServeOptions, create_app
    from tunesmith.serve.requestlog import DEFAULT_NAME, RequestLog

    from tunesmith.artifacts import open_run

    sock = bind(config.host, config.port)
    served = None
    try:
        log_path = Path(config.log or open_run(config.run).root / DEFAULT_NAME)
        if log_path.exists():  # an existing file that can't be a log fails before the model loads
            RequestLog(log_path).close()
        served = load_served(config, echo)
        if config.parity:
            check_served_parity(served, echo)
        else:
            echo("parity: not checked (--no-parity)")
        request_log = RequestLog(log_path, log_content=config.log_content)  # made only once serving can start
        options = ServeOptions(max_tokens=config.max_tokens, timeout_s=config.timeout_s, api_key=config.api_key)
        app = create_app(served, request_log, options)
        app.state.ready = True
        host, port = sock.getsockname()[:2]
        echo(f"serving {served.name} ({served.kind}) at http://{host}:{port}/v1 — request log {request_log.path}; "
             "Ctrl+C stops")
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
        request_log.close()
    finally:
        sock.close()
        if served is not None and served.engine is not None:
            served.engine.stop()
    return 0


# ----------------------------------------------------------------------------------------------- vllm

def vllm_command(config: ServeConfig) -> dict[str, Path]:
    """Write RUN/serve/vllm.sh (the equivalent `vllm serve` command), chat_template.jinja and parity_prompts.jsonl;
    return the paths. A RunError for a run vLLM can't serve as it is."""
    import json
    import shlex

    from tunesmith.artifacts import atomic_write, open_run
    from tunesmith.methods.adapters import run_adapter
    from tunesmith.serve.parity import parity_prompts

    run = open_run(config.run)
    manifest = run.read_manifest()
    if run_kind(run.root) != "generate":
        raise RunError(f"{run.root}: a classifier or reward run; `vllm serve` answers text",
                       f"export it with `tunesmith export {run.root} --merge` and serve that folder with vLLM's "
                       "pooling task")
    folder = run.root / "serve"
    folder.mkdir(exist_ok=True)
    name = run.root.name
    template = folder / "chat_template.jinja"
    chat_template = _chat_template(run)
    lines: list[list[str]] = []  # one flag (with its values) per line of the script
    if manifest.get("saved") == "adapter":
        adapter = run_adapter(run, manifest).adapter
        if adapter != "lora":
            raise RunError(f"{run.root}: vLLM serves LoRA adapters, not `{adapter}`",
                           f"merge it with `tunesmith export {run.root} --merge` and serve the merged folder")
        from tunesmith.model import resolve_model

        bm = manifest["base_model"]
        source = resolve_model(bm["name"], bm.get("cache_dir"))  # a folder (or .gguf file) vLLM can read
        base = (source.path / source.gguf_file if source.gguf_file else source.path).resolve()
        modules = {name: run.adapter.resolve(),
                   **{n: open_run(p).adapter.resolve() for n, p in config.adapters.items()}}
        lines += [["vllm", "serve", str(base)], ["--enable-lora"],
                  ["--max-lora-rank", str(_max_rank(modules.values()))],
                  ["--lora-modules", *(f"{n}={p}" for n, p in modules.items())],
                  ["--served-model-name", f"{name}-base"]]
    elif manifest.get("saved") == "none":
        raise RunError(f"{run.root}: a {manifest.get('method')} run prompts its base model with examples, which "
                       "`vllm serve` can't add", "serve it with `tunesmith serve`")
    else:
        merged = run.root / "merged"
        lines += [["vllm", "serve", str(merged if merged.is_dir() else _full_weights(run))],
                  ["--served-model-name", name]]
    lines += [["--chat-template", str(template.resolve())], ["--generation-config", str(run.root.resolve())],
              ["--host", config.host, "--port", str(config.port)]]
    quoted = [" ".join(shlex.quote(a) for a in line) for line in lines]
    if config.api_key:
        quoted.append('--api-key "$VLLM_API_KEY"')
    script = ("#!/bin/sh\n# written by `tunesmith serve --print-vllm`; the run's parity prompts are in "
              "parity_prompts.jsonl beside it\n" + " \\\n  ".join(quoted) + "\n")
    prompts = "".join(json.dumps({"messages": p}, ensure_ascii=False) + "\n" for p in parity_prompts(run.root))
    paths = {"command": folder / "vllm.sh", "template": template, "prompts": folder / "parity_prompts.jsonl"}
    for path, text in ((paths["command"], script), (template, chat_template), (paths["prompts"], prompts)):
        atomic_write(path, text)
    paths["command"].chmod(0o755)
    paths["script"] = script
    return paths


def _chat_template(run) -> str:
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(run.tokenizer).chat_template
    if not isinstance(template, str) or not template:
        raise RunError(f"{run.tokenizer}: the run's tokenizer has no chat template", "vLLM would guess one; train "
                       "the run with a model that has a chat template")
    return template


def _max_rank(adapter_folders) -> int:
    import json

    ranks = [json.loads((Path(f) / "adapter_config.json").read_text()).get("r", 16) for f in adapter_folders]
    return max(8, *ranks)


def _full_weights(run) -> Path:
    """The folder of a full fine-tune's weights (config.json beside them)."""
    for folder in (run.root / "model", run.root):
        if (folder / "config.json").is_file():
            return folder
    raise RunError(f"{run.root}: no model weights folder with config.json", f"run `tunesmith export {run.root} "
                   "--merge` and serve the merged folder")
