"""Parity, checked not hoped for: the served model answers the run's own validation prompts with exactly the tokens
the run's generation path (`tunesmith generate`) gives, or serving refuses to start and says what differs.

`tunesmith serve` checks its engine against the run; `tunesmith export --merge` checks the merged folder it writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunesmith.errors import RunError, TunesmithError

PROMPTS = 3  # validation prompts answered at start-up
MAX_NEW_TOKENS = 16  # tokens compared per prompt


@dataclass
class ParityCase:
    """One prompt answered both ways."""

    messages: list[dict[str, str]]
    expected: list[int]  # the run's generation path
    served: list[int]  # the path under test
    expected_text: str
    served_text: str

    @property
    def same(self) -> bool:
        return self.expected == self.served

    def first_difference(self) -> int:
        pairs = list(zip(self.expected, self.served))
        return next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))


@dataclass
class ParityResult:
    """Every prompt's two answers, and what may explain a difference."""

    cases: list[ParityCase]
    what: str  # "served engine", "merged folder"
    causes: list[str]

    @property
    def ok(self) -> bool:
        return all(c.same for c in self.cases)

    def describe(self) -> str:
        """One line per prompt: same, or where and how the answers part."""
        same = sum(c.same for c in self.cases)
        lines = [f"parity: {same}/{len(self.cases)} validation prompts answered with identical tokens by the "
                 f"{self.what} and the run's generation path"]
        for i, case in enumerate(self.cases, 1):
            if case.same:
                lines.append(f"  prompt {i}: same {len(case.expected)} tokens")
                continue
            at = case.first_difference()
            lines.append(f"  prompt {i}: differs at token {at} (run: {case.expected[at:at + 4]}…, "
                         f"{self.what}: {case.served[at:at + 4]}…)")
            lines.append(f"    run:    {case.expected_text[:120]!r}")
            lines.append(f"    served: {case.served_text[:120]!r}")
        lines += [f"  possible cause: {c}" for c in self.causes]
        return "\n".join(lines)


def parity_prompts(run_path: str | Path, n: int = PROMPTS) -> list[list[dict[str, str]]]:
    """The prompt messages of the run's first `n` validation rows that a model answers in text (chat, instruction,
    preference, completion rows; the run's system prompt in front), [] when it holds none."""
    from tunesmith.artifacts import open_run
    from tunesmith.data.format import prompt_messages
    from tunesmith.data.snapshot import read_snapshot

    run = open_run(run_path)
    system_prompt = (run.read_recipe().get("data") or {}).get("system_prompt") if run.recipe.exists() else None
    prompts = []
    for record in read_snapshot(run.root).validation:
        try:
            prompts.append(prompt_messages(record, system_prompt))
        except (ValueError, KeyError, TunesmithError):  # a row with no assistant turn to answer
            continue
        if len(prompts) == n:
            break
    return prompts


def check_parity(reference, answer: Callable[[list[list[dict[str, str]]]], list[list[int]]],
                 prompts: list[list[dict[str, str]]], what: str, candidate=None,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> ParityResult:
    """Answer `prompts` greedily with `reference` (a generate.Loaded, through tunesmith.generate) and with
    `answer` (the serving path: prompts -> token ids, up to and including the end-of-turn token) and compare.
    `candidate` (a Loaded) lets a difference be explained by its template, end-of-turn tokens or dtype."""
    from tunesmith.generate import generate_tokens

    expected = [generate_tokens(reference, [p], max_new_tokens)[0] for p in prompts]  # one at a time: no padding
    served = answer(prompts)
    tok = reference.tokenizer
    cases = [ParityCase(p, e, s, tok.decode(e, skip_special_tokens=False), tok.decode(s, skip_special_tokens=False))
             for p, e, s in zip(prompts, expected, served)]
    causes = [] if all(c.same for c in cases) else _causes(reference, candidate or reference, prompts)
    return ParityResult(cases, what, causes)


def _causes(reference, candidate, prompts) -> list[str]:
    """What differs between the two sides' set-ups (template, end-of-turn tokens, dtype), or the weights."""
    from tunesmith.generate import end_of_turn_ids, prompt_ids

    causes = []
    if prompts and prompt_ids(reference, prompts[0]) != prompt_ids(candidate, prompts[0]):
        causes.append("chat template: the two sides build different prompt tokens")
    if set(end_of_turn_ids(reference)) != set(end_of_turn_ids(candidate)):
        causes.append(f"end-of-turn tokens: run {end_of_turn_ids(reference)}, other {end_of_turn_ids(candidate)}")
    dtypes = {_dtype(reference.model), _dtype(candidate.model)}
    if len(dtypes) > 1:
        causes.append(f"dtype: {' vs '.join(sorted(dtypes))}")
    if not causes:
        causes.append("the weights (same template, end-of-turn tokens and dtype, different logits)"
                      if candidate is not reference else
                      "the serving path's decoding (same weights and template): batching or cache handling")
    return causes


def _dtype(model) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def require(result: ParityResult) -> None:
    """A RunError describing the differences unless every prompt was answered identically."""
    if not result.ok:
        raise RunError(result.describe(), "serve the run with the chat template, end-of-turn tokens and dtype it "
                       "was trained with (or pass --no-parity to serve anyway, knowing the answers differ)")


def engine_answer(engine, loaded, max_new_tokens: int = MAX_NEW_TOKENS, adapter: str | None = None) -> Callable:
    """The serving path as `check_parity`'s `answer`: each prompt through the engine (with `adapter`, None = the
    served run), greedy, in parallel; prompts in the served run's template (`loaded`)."""
    from tunesmith.generate import prompt_ids
    from tunesmith.serve.engine import GenRequest

    def answer(prompts: list[list[dict[str, str]]]) -> list[list[int]]:
        streams = [engine.submit(GenRequest(prompt_ids(loaded, p), max_new_tokens, adapter=adapter))
                   for p in prompts]
        return [list(stream.wait().token_ids) for stream in streams]

    return answer


def export_parity(run_path: str | Path, folder: str | Path, n: int = PROMPTS) -> ParityResult:
    """The merged model folder `export --merge` wrote against the run itself, on the run's validation prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tunesmith.generate import Loaded, generate_tokens, load_run

    reference = load_run(run_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=next(reference.model.parameters()).dtype).eval()
    merged = Loaded(model, tokenizer, GenerationConfig.from_pretrained(folder), f"merged ({folder})")

    def answer(prompts):
        return [generate_tokens(merged, [p], MAX_NEW_TOKENS)[0] for p in prompts]

    return check_parity(reference, answer, parity_prompts(run_path, n), "merged folder", candidate=merged)


# ----------------------------------------------------------------------------------------------- another server


def remote_parity(run_path: str | Path, url: str, model: str | None = None, api_key: str | None = None,
                  max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict[str, object]]:
    """The run's parity prompts (RUN/serve/parity_prompts.jsonl, written by `serve --print-vllm`, else its first
    validation prompts) answered greedily by the OpenAI-compatible server at `url` (vLLM, or another tunesmith) and
    by the run's own generation path; one dict per prompt: messages, expected, served, same (answer texts, stripped,
    as `tunesmith generate` gives them)."""
    import json

    from tunesmith.artifacts import open_run
    from tunesmith.generate import generate, load_run

    run = open_run(run_path)
    written = run.root / "serve" / "parity_prompts.jsonl"
    if written.is_file():
        prompts = [json.loads(line)["messages"] for line in written.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    else:
        prompts = parity_prompts(run.root)
    if not prompts:
        raise RunError(f"{run.root}: no validation prompts to check with", "the run holds no rows a model answers")
    name = model or run.root.name
    served = [_remote_answer(url, name, messages, max_new_tokens, api_key) for messages in prompts]
    expected = generate(load_run(run.root), prompts, max_new_tokens=max_new_tokens)
    return [{"messages": m, "expected": e, "served": s, "same": e.strip() == s.strip()}
            for m, e, s in zip(prompts, expected, served)]


def _remote_answer(url: str, model: str, messages: list[dict[str, str]], max_tokens: int, key: str | None) -> str:
    """One greedy chat completion from the server at `url`; a TunesmithError naming the server when it fails."""
    import json
    import urllib.error
    import urllib.request

    base = url.rstrip("/").removesuffix("/v1")
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"] or ""
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:300]
        raise TunesmithError(f"--parity {url}: the server answered {exc.code}: {detail}",
                             "check --model (the served model's name) and --api-key-env") from None
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
        raise TunesmithError(f"--parity {url}: no usable answer ({exc})",
                             "give the server's base URL, e.g. http://127.0.0.1:8000/v1") from None


def describe_remote(cases: list[dict[str, object]], url: str) -> str:
    """One line per prompt: the same answer, or both answers."""
    same = sum(bool(c["same"]) for c in cases)
    lines = [f"parity: {same}/{len(cases)} validation prompts answered the same by {url} and the run's generation "
             "path (greedy)"]
    for i, case in enumerate(cases, 1):
        if case["same"]:
            lines.append(f"  prompt {i}: same answer")
        else:
            lines += [f"  prompt {i}: differs", f"    run:    {str(case['expected'])[:120]!r}",
                      f"    served: {str(case['served'])[:120]!r}"]
    return "\n".join(lines)
