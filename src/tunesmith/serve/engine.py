"""Continuous batching over a run's model: concurrent requests share every forward pass.

One scheduler thread owns the model. Between decode steps it prefills the requests that have arrived (one
left-padded batch) and joins them to the running batch: the ordinary KV cache (transformers' DynamicCache, per layer
`keys`/`values` of shape [batch, heads, time, head_dim]) is padded on the left along time and concatenated along the
batch axis; the attention mask marks the padding and position ids are counted from the mask, as `model.generate`
does for a padded batch. A finished request leaves the batch (index_select on the batch axis) and the time columns
no request uses any more are dropped. On a CPU this is several times faster than transformers' paged continuous
batching (STACK-NOTES: serving).

Adapters: the served run is usually a LoRA PeftModel (adapter "default"); other LoRA runs of the same base are loaded
beside it and a batch mixes them with peft's `adapter_names` forward argument ("__base__" = no adapter).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunesmith.errors import ModelError, RunError, TunesmithError

SERVED = "default"  # peft's name for the served run's own adapter
MIXABLE = ("lora", "qlora")  # adapters peft can mix in one batch (DoRA and the rest can't: adapter_names refuses)


class QueueFull(TunesmithError):
    """max_waiting requests already wait for a place in the batch (HTTP 429)."""


@dataclass
class GenRequest:
    """One generation: the prompt's token ids and how to sample and stop."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # per-request torch.Generator: same seed, same answer
    stop: tuple[str, ...] = ()  # OpenAI `stop` strings (the text is cut before the string)
    adapter: str | None = None  # an adapter loaded with Engine.load_adapter; None = the served run's own weights
    timeout_s: float | None = None  # from submit; past it the request finishes with finish_reason "timeout"


@dataclass
class Event:
    """New text of one request: the text delta and the token ids generated since the previous event."""

    text: str
    token_ids: list[int]


_END = object()


class Stream:
    """What `Engine.submit` returns: iterate it for Events (blocking); the totals are set when it ends."""

    def __init__(self, request: GenRequest):
        self.request = request
        self.finish_reason: str | None = None  # stop | length | timeout | cancelled | error
        self.error: str | None = None  # the reason, when finish_reason is "error"
        self.text = ""
        self.token_ids: list[int] = []
        self.prompt_tokens = len(request.prompt_ids)
        self.completion_tokens = 0
        self.queued_at = time.monotonic()
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = False
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()

    def __iter__(self) -> Iterator[Event]:
        while True:
            item = self._events.get()
            if item is _END:
                return
            yield item

    def cancel(self) -> None:
        """The client went away: the request leaves the batch before the next decode step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Stream:
        """Block until the request has finished (events stay readable); returns the stream."""
        self._done.wait(timeout)
        return self

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _emit(self, text: str, ids: list[int]) -> None:
        self.text += text
        self._events.put(Event(text, ids))

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error, self.finished_at = reason, error, time.monotonic()
        self._events.put(_END)
        self._done.set()


class _Seq:
    """A request in the engine: its generated ids, sampler, and what of its text has been sent."""

    def __init__(self, stream: Stream, stop_ids: set[int], tokenizer):
        req = stream.request
        self.stream, self.req, self.stop_ids, self.tokenizer = stream, req, stop_ids, tokenizer
        self.ids: list[int] = []
        self.unsent: list[int] = []  # ids not yet sent in an event
        self.sent = 0  # characters of the decoded text already sent
        self.deadline = stream.queued_at + req.timeout_s if req.timeout_s is not None else None
        self.generator = None

    def sampler(self, device):
        """The request's own generator (seeded by `seed`, else at random), made on first use."""
        import torch

        if self.generator is None:
            self.generator = torch.Generator(device=device)
            seed = self.req.seed if self.req.seed is not None else random.SystemRandom().randrange(2 ** 63)
            self.generator.manual_seed(seed)
        return self.generator

    def push(self, token: int) -> str | None:
        """Add a generated token, send the text that is now safe to show; the finish reason when it ends."""
        stream = self.stream
        if stream.first_token_at is None:
            stream.first_token_at = time.monotonic()
        self.ids.append(token)
        self.unsent.append(token)
        stream.completion_tokens = len(self.ids)
        stream.token_ids = self.ids
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = _first_stop(full, self.req.stop)
        if cut is not None:
            self._send(full, cut)
            return "stop"
        if token in self.stop_ids:
            self._send(full, len(full))
            return "stop"
        if len(self.ids) >= self.req.max_new_tokens:
            self._send(full, len(full))
            return "length"
        self._send(full, _safe_end(full, self.req.stop))
        return None

    def _send(self, full: str, end: int) -> None:
        if end > self.sent and full.startswith(self.stream.text):
            self.stream._emit(full[self.sent:end], self.unsent)
            self.unsent, self.sent = [], end


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of text can be shown: not a trailing part of a multi-byte character still being generated (shown
    as U+FFFD), nor a suffix that may still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), held, -1):
            if text.endswith(s[:k], 0, end):
                held = k
                break
    return end - held


class Engine:
    """Continuous batching over `loaded` (tunesmith.generate.Loaded): submit requests from any thread."""

    def __init__(self, loaded, max_batch: int = 16, max_waiting: int = 64):
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.stop_ids = _eos_ids(loaded)
        _check_batchable(self.model)
        _check_generation_config(loaded.generation_config)
        self._extra: dict[str, str] = {}  # adapter name -> run folder, loaded beside the served run
        self._unloading: set[str] = set()
        self._waiting: deque[_Seq] = deque()
        self._seqs: list[_Seq] = []  # the running batch, in the cache's batch order
        self._fresh: list[_Seq] = []  # taken from the queue, being prefilled
        self._cache = None
        self._mask = None  # [batch, time] 1 where the cache holds a token of that request
        self._cv = threading.Condition()
        self._model_lock = threading.Lock()  # held for each forward pass and each adapter load/unload
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- public face ----------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """The adapters loaded beside the served run (requests name them in `GenRequest.adapter`)."""
        return sorted(n for n in self._extra if n not in self._unloading)

    @property
    def running(self) -> int:
        return len(self._seqs)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> Engine:
        """Start the scheduler thread."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the scheduler; requests still waiting or running finish as "cancelled"."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for seq in list(self._waiting) + self._seqs:
            seq.stream._finish("cancelled")
        self._waiting.clear()
        self._drop_all()

    def submit(self, request: GenRequest) -> Stream:
        """Queue a request; its Stream yields text as it is generated. QueueFull when max_waiting already wait."""
        _check_request(request)
        stream = Stream(request)
        with self._cv:
            if request.adapter is not None and (request.adapter not in self._extra or request.adapter in
                                                self._unloading):
                raise RunError(f"no adapter {request.adapter!r} is loaded",
                               f"loaded: {', '.join(self.adapters) or 'none'}")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests already wait (max_waiting {self.max_waiting})",
                                "retry later, or serve with a larger --max-waiting")
            self._waiting.append(_Seq(stream, self.stop_ids, self.tokenizer))
            self._cv.notify_all()
        return stream

    def load_adapter(self, name: str, run_path: str | Path) -> None:
        """Load another LoRA run of the served base as adapter `name`, between decode steps."""
        if name in self._extra or name in (SERVED, "__base__"):
            raise RunError(f"an adapter named {name!r} is already loaded", "unload it first, or choose another name")
        run = self._check_adapter_run(run_path)
        with self._model_lock:
            self.model.load_adapter(str(run.adapter), adapter_name=name)
            self.model.eval()
        with self._cv:
            self._extra[name] = str(run.root)

    def unload_adapter(self, name: str, timeout_s: float | None = None) -> None:
        """Unload adapter `name` once its waiting and running requests have finished; new ones are refused."""
        with self._cv:
            if name not in self._extra or name in self._unloading:
                raise RunError(f"no adapter {name!r} is loaded", f"loaded: {', '.join(self.adapters) or 'none'}")
            self._unloading.add(name)
            done = self._cv.wait_for(lambda: not any(s.req.adapter == name for s in self._in_flight()),
                                     timeout_s)
            if not done:
                self._unloading.discard(name)
                raise RunError(f"adapter {name!r} still has requests in flight after {timeout_s}s",
                               "try again when they have finished")
        with self._model_lock:
            self.model.delete_adapter(name)
        with self._cv:
            del self._extra[name]
            self._unloading.discard(name)

    def _in_flight(self) -> list[_Seq]:
        return [*self._waiting, *self._fresh, *self._seqs]

    # -- adapters ---------------------------------------------------------------------------------------------------
    def _check_adapter_run(self, run_path):
        """The run folder, or a RunError when it can't join the served model (not LoRA, another base)."""
        from tunesmith.artifacts import open_run
        from tunesmith.methods.adapters import run_adapter

        own = getattr(self.model, "peft_config", {}).get(SERVED)
        if own is None or own.peft_type != "LORA" or getattr(own, "use_dora", False):
            raise RunError("the served run is not a LoRA adapter run, so other adapters can't be loaded beside it",
                           "serve a run trained with `adapter: lora` (or qlora; not DoRA) to serve several "
                           "adapters of its base")
        run = open_run(run_path)
        manifest = run.read_manifest()
        adapter = run_adapter(run, manifest).adapter if manifest.get("saved") == "adapter" else None
        config = _adapter_config(run)
        if adapter not in MIXABLE or config.get("peft_type") != "LORA" or config.get("use_dora"):
            raise RunError(f"{run.root}: a `{adapter or manifest.get('saved')}` run can't be served beside another "
                           "adapter", f"only {' and '.join(MIXABLE)} runs (without DoRA) mix in one batch; serve "
                                      "this run on its own")
        if (adapter == "qlora") != (getattr(self.model.config, "quantization_config", None) is not None):
            raise RunError(f"{run.root}: a `{adapter}` adapter needs a "
                           f"{'4-bit' if adapter == 'qlora' else 'full-precision'} base, and the served one isn't",
                           "serve qlora runs beside qlora runs and lora runs beside lora runs")
        served = own.base_model_name_or_path
        bm = manifest.get("base_model") or {}
        if served not in (bm.get("resolved"), bm.get("name"), config.get("base_model_name_or_path")):
            raise RunError(f"{run.root}: trained on {bm.get('name')!r}, the served run on {served!r}",
                           "adapters served together must share their base model")
        return run

    def _adapter_kwargs(self) -> dict[str, Any]:
        """peft's per-row adapter choice, once adapters beside the served one are loaded."""
        if not self._extra:
            return {}
        return {"adapter_names": [s.req.adapter or SERVED for s in self._seqs]}

    # -- the scheduler ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._stopping or self._waiting or self._seqs, 0.5)
                    if self._stopping:
                        return
                    self._expire_waiting()
                    fresh = [self._waiting.popleft() for _ in range(min(len(self._waiting),
                                                                        self.max_batch - len(self._seqs)))]
                    self._fresh = fresh  # still counted as in flight by unload_adapter
                if fresh:
                    self._guarded(lambda: self._prefill(fresh), fresh)  # a failure ends only the new requests
                if self._seqs:
                    self._guarded(self._decode, self._seqs)
                with self._cv:
                    self._fresh = []
                    self._cv.notify_all()

    def _guarded(self, step, affected: list[_Seq]) -> None:
        """Run a prefill or decode step; when it raises, its requests end with finish_reason "error" (and the
        whole running batch, when the step had already touched the batch's cache)."""
        try:
            step()
        except Exception as exc:  # a failed forward pass ends the requests it ran, not the engine
            with self._cv:
                self._fresh = []
                if any(seq in self._seqs for seq in affected):
                    affected = affected + self._seqs
                    self._drop_all()
                for seq in affected:
                    if not seq.stream.done:
                        seq.stream._finish("error", f"{type(exc).__name__}: {exc}")

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for seq in list(self._waiting):
            if seq.stream.cancelled or (seq.deadline is not None and now >= seq.deadline):
                self._waiting.remove(seq)
                seq.stream._finish("cancelled" if seq.stream.cancelled else "timeout")

    def _prefill(self, fresh: list[_Seq]) -> None:
        """Run the new prompts as one left-padded batch, sample their first tokens and join them to the batch."""
        import torch
        from transformers import DynamicCache

        width = max(len(s.req.prompt_ids) for s in fresh)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(s.req.prompt_ids)) + s.req.prompt_ids for s in fresh])
        mask = torch.tensor([[0] * (width - len(s.req.prompt_ids)) + [1] * len(s.req.prompt_ids) for s in fresh])
        device = self.model.device
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache(config=self.model.config)
        adapters = {"adapter_names": [s.req.adapter or SERVED for s in fresh]} if self._extra else {}
        started = time.monotonic()
        for seq in fresh:
            seq.stream.started_at = started
        with self._model_lock:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                             past_key_values=cache, use_cache=True, logits_to_keep=1, **adapters)
        self._join(fresh, out.past_key_values, mask)
        self._advance(out.logits[:, -1, :], first=len(self._seqs) - len(fresh))

    def _decode(self) -> None:
        """One decode step over the running batch: each request's last token in, its next token out."""
        import torch

        device = self.model.device
        last = torch.tensor([[s.ids[-1]] for s in self._seqs], device=device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(self._seqs), 1))], dim=1)
        with self._model_lock:
            out = self.model(input_ids=last, attention_mask=mask, position_ids=_positions(mask)[:, -1:],
                             past_key_values=self._cache, use_cache=True, logits_to_keep=1,
                             **self._adapter_kwargs())
        self._cache, self._mask = out.past_key_values, mask
        self._advance(out.logits[:, -1, :], first=0)

    def _advance(self, logits, first: int) -> None:
        """Sample a token for each request from row `first` of the batch on (logits row 0 is batch row `first`),
        then let the finished ones go."""
        now, finished = time.monotonic(), {}
        for row, seq in enumerate(self._seqs[first:], start=first):
            reason = "cancelled" if seq.stream.cancelled else seq.push(_sample(logits[row - first], seq))
            if reason is None and seq.deadline is not None and now >= seq.deadline:
                reason = "timeout"
            if reason is not None:
                finished[row] = reason
        if finished:
            with self._cv:
                done = [(self._seqs[row], reason) for row, reason in finished.items()]
                self._select([i for i in range(len(self._seqs)) if i not in finished])
                for seq, reason in done:  # after they left the batch: `running` no longer counts them
                    seq.stream._finish(reason)

    # -- the batch's KV cache ---------------------------------------------------------------------------------------
    def _join(self, fresh: list[_Seq], cache, mask) -> None:
        """Add the prefilled requests (their cache and mask) to the running batch."""
        import torch
        import torch.nn.functional as F

        with self._cv:
            self._fresh = []
            if not self._seqs:
                self._seqs, self._cache, self._mask = list(fresh), cache, mask
                return
            width = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(self._cache.layers, cache.layers):
                for attr in ("keys", "values"):
                    a, b = getattr(old, attr), getattr(new, attr)
                    setattr(old, attr, torch.cat([F.pad(a, (0, 0, width - a.shape[2], 0)),
                                                  F.pad(b, (0, 0, width - b.shape[2], 0))], dim=0))
            self._mask = torch.cat([F.pad(self._mask, (width - self._mask.shape[1], 0)),
                                    F.pad(mask, (width - mask.shape[1], 0))], dim=0)
            self._seqs.extend(fresh)

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows of the batch, and drop the time columns no remaining request uses."""
        import torch

        if not keep:
            self._drop_all()
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._mask = mask[:, start:]
        self._seqs = [self._seqs[i] for i in keep]

    def _drop_all(self) -> None:
        self._seqs, self._cache, self._mask = [], None, None


def _positions(mask):
    """Position ids counted over the real tokens of each row (padding gets 0), as generate() does."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _sample(logits, seq: _Seq) -> int:
    """The next token: the most likely at temperature 0, else sampled with temperature and nucleus top_p."""
    import torch

    req = seq.req
    if req.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / req.temperature, dim=-1)
    if req.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= req.top_p  # the first token always stays
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=seq.sampler(probs.device)))


def _eos_ids(loaded) -> set[int]:
    """The run's end-of-turn ids: generation_config.eos_token_id (an int or a list), else the tokenizer's."""
    eos = getattr(loaded.generation_config, "eos_token_id", None)
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}


def _check_batchable(model) -> None:
    """A ModelError when the model's cache can't be joined and split per request (sliding windows, prompt
    learning adapters that bring their own cache)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    configs = getattr(model, "peft_config", {}) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in configs.values()):
        raise ModelError("prefix and prompt tuning adapters put virtual tokens in the cache, which the batching "
                         "engine can't share", "use `tunesmith generate` for this run, or train a lora adapter")
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise ModelError(f"the batching engine needs full-attention cache layers; this model uses "
                         f"{', '.join(sorted(kinds))}", "use `tunesmith generate` for this model")


# settings of a run's generation config that change greedy answers, which the engine does not apply: refused, so
# that the served answers never silently differ from `tunesmith generate`'s
UNSUPPORTED = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0, "min_new_tokens": None,
               "num_beams": 1}


def _check_generation_config(config) -> None:
    """A ModelError naming the settings of the run's generation_config.json that the engine would not apply."""
    found = {k: getattr(config, k) for k, default in UNSUPPORTED.items() if getattr(config, k, default) not in
             (default, None, [], {})}
    if found:
        listed = ", ".join(f"{k}={v!r}" for k, v in found.items())
        raise ModelError(f"the run's generation_config.json sets {listed}, which the batching engine does not apply "
                         "(its answers would differ from `tunesmith generate`'s)",
                         "remove these settings from the run's generation_config.json to serve it")


def _adapter_config(run) -> dict:
    import json

    path = run.adapter / "adapter_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _check_request(req: GenRequest) -> None:
    if not req.prompt_ids:
        raise ValueError("prompt_ids is empty")
    if req.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {req.max_new_tokens}")
    if req.temperature < 0 or not 0 < req.top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {req.temperature}, {req.top_p}")
