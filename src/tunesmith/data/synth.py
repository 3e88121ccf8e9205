"""Synthetic data: a teacher model writes new rows from seed examples or from documents; every row is checked.

A teacher is anything with `complete(conversations, max_new_tokens, temperature, seed) -> list[str]`: a model
tunesmith can load (`LocalTeacher`) or an OpenAI-compatible HTTP endpoint (`HTTPTeacher`). Generated rows go
through the same checks as training data (format, length, duplicates of the existing data and of each other,
leakage of evaluation prompts, broken text, PII) and land in a review file (see `tunesmith.data.review`): rows
that pass are `pending`, the others `rejected` with their reasons. Nothing reaches training until accepted.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from tunesmith.artifacts import atomic_write
from tunesmith.data.records import FIELDS, Record, load_records, record_text
from tunesmith.data.review import convert_row, review_row, write_jsonl_atomic
from tunesmith.errors import DataError, ModelError

CHUNK_CHARS = 1500  # document chunk size, split on paragraph then sentence boundaries
MIN_WORDS = 3  # an answer (or text) shorter than this many words is rejected as too short
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
DOC_COLUMNS = {"instruction": "question", "output": "answer"}  # the documents prompt's reply -> instruction row


class Teacher(Protocol):
    """Writes one reply per conversation."""

    name: str

    def complete(self, conversations: list[list[dict]], max_new_tokens: int, temperature: float,
                 seed: int) -> list[str]: ...


class LocalTeacher:
    """A model tunesmith can load: a run folder (with manifest.json), `default`, a model folder or a .gguf file."""

    def __init__(self, spec: str, cache_dir: str | None = None, batch_size: int = 8, dtype=None):
        from tunesmith.generate import Loaded, load_run  # generation lives above the data layer; load lazily

        self.name, self.batch_size = str(spec), batch_size
        if (Path(spec) / "manifest.json").exists():
            self.loaded = load_run(spec, dtype=dtype)
        else:
            from tunesmith.model import load_model, load_tokenizer, resolve_model

            source = resolve_model(str(spec), cache_dir)
            tokenizer = load_tokenizer(source)
            if not getattr(tokenizer, "chat_template", None):
                raise ModelError(f"teacher {spec}: its tokenizer has no chat template",
                                 "use an instruction-tuned (chat) model as the teacher, e.g. `default`")
            tokenizer.padding_side = "left"
            model = load_model(source, dtype=dtype)
            model.eval()
            self.loaded = Loaded(model, tokenizer, model.generation_config, source.describe())

    def complete(self, conversations: list[list[dict]], max_new_tokens: int, temperature: float,
                 seed: int) -> list[str]:
        """Generate one reply per conversation, batched; sampling is seeded."""
        import torch

        from tunesmith.generate import generate

        torch.manual_seed(seed)
        return generate(self.loaded, conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                        batch_size=self.batch_size)


class HTTPTeacher:
    """An OpenAI-compatible chat endpoint: POST {base_url}/chat/completions, one request per conversation."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 concurrency: int = 1):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.concurrency = max(1, concurrency)  # requests in flight at once
        self.name = f"{base_url.rstrip('/')} ({model})"

    def complete(self, conversations: list[list[dict]], max_new_tokens: int, temperature: float,
                 seed: int) -> list[str]:
        """One reply per conversation, in order; conversation i is sent with seed `seed + i`."""
        def ask(i: int) -> str:
            return self._ask(conversations[i], max_new_tokens, temperature, seed + i)

        if self.concurrency == 1 or len(conversations) < 2:
            return [ask(i) for i in range(len(conversations))]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(self.concurrency, len(conversations))) as pool:
            return list(pool.map(ask, range(len(conversations))))

    def _ask(self, messages: list[dict], max_new_tokens: int, temperature: float, seed: int) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                "temperature": temperature, "seed": seed}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            start = exc.read()[:300].decode("utf-8", "replace").strip()
            raise DataError(f"teacher {self.url}: HTTP {exc.code} {exc.reason}: {start or '(empty body)'}",
                            "check the model name, the API key variable and the server's log") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(f"teacher {self.url}: can't connect ({reason})",
                            "is the server running, and is the base URL right (e.g. http://127.0.0.1:8000/v1)?") \
                from None
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise DataError(f"teacher {self.url}: malformed reply, expected an OpenAI chat completion: "
                            f"{raw[:200].decode('utf-8', 'replace')!r}",
                            "is this an OpenAI-compatible endpoint? the base URL usually ends in /v1") from None
        if not isinstance(content, str):
            raise DataError(f"teacher {self.url}: malformed reply, message content is {type(content).__name__}",
                            "is this an OpenAI-compatible chat endpoint?")
        return content


@dataclass(frozen=True)
class Document:
    """A text to draw question/answer pairs from, and what to call it in provenance."""

    name: str
    text: str


@dataclass(frozen=True)
class Job:
    """One prompt to the teacher and what the reply should become."""

    conversation: list[dict]
    kind: str
    source: dict[str, Any]
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class SynthResult:
    """The generated rows as review-file rows (pending or rejected) and counts for the summary."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    def write(self, path: str | Path) -> tuple[Path, Path]:
        """Write the review file (atomically) and its summary next to it as `<name>.summary.json`."""
        path = Path(path)
        write_jsonl_atomic(path, self.rows)
        summary = path.with_name(path.stem + ".summary.json")
        atomic_write(summary, json.dumps(self.summary, indent=2) + "\n")
        return path, summary


def load_documents(paths: list[str | Path]) -> list[Document]:
    """Plain text files (.txt, .md, .rst) as one document each; data files as one document per record."""
    docs = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such document", "give text files (.txt, .md) or a data file of text rows")
        if path.suffix.lower() in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append(Document(path.name, text))
            continue
        loaded = load_records(path)
        docs += [Document(f"{path.name}:{r.line}", record_text(r.kind, r.data)) for r in loaded.records]
    if not docs:
        raise DataError(f"no text in the documents {', '.join(map(str, paths))}", "the files are empty")
    return docs


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Split text into pieces of at most ~`size` characters on paragraph, then sentence, then word boundaries."""
    pieces: list[tuple[int, str]] = []  # (paragraph number, text)
    for number, paragraph in enumerate(re.split(r"\n\s*\n", text.strip())):
        paragraph = paragraph.strip()
        if len(paragraph) <= size:
            pieces.append((number, paragraph))
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            pieces += [(number, s) for s in (_split_words(sentence, size) if len(sentence) > size else [sentence])]
    chunks: list[str] = []
    last = -1
    for number, piece in pieces:
        if not piece:
            continue
        joiner = " " if number == last else "\n\n"
        if chunks and len(chunks[-1]) + len(joiner) + len(piece) <= size:
            chunks[-1] += joiner + piece
        else:
            chunks.append(piece)
        last = number
    return chunks


def _split_words(sentence: str, size: int) -> list[str]:
    out, current = [], ""
    for word in sentence.split():
        while len(word) > size:
            if current:
                out.append(current)
                current = ""
            out.append(word[:size])
            word = word[size:]
        if current and len(current) + 1 + len(word) > size:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return out + ([current] if current else [])


def first_json_object(reply: str) -> dict[str, Any] | None:
    """The first JSON object in a reply, tolerating ```json fences and prose around it; None when there is none."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", reply):
        try:
            value, _ = decoder.raw_decode(reply, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def seed_prompt(examples: list[Record], kind: str, label: str | None = None) -> str:
    """Ask for one new row like the examples, as a JSON object with the same fields (of `label` if given)."""
    fields = FIELDS[kind]
    shown = "\n".join(json.dumps({f: r.data[f] for f in fields}, ensure_ascii=False) for r in examples)
    names = ", ".join(f'"{f}"' for f in fields)
    want = f' Its "label" must be "{label}".' if label is not None else ""
    return (f"Here are {len(examples)} example rows from a dataset of {kind} rows, one JSON object per line:\n\n"
            f"{shown}\n\n"
            f"Write ONE new row for the same dataset. Make it different from every example (a new case, not a "
            f"rewording) but of the same style, length and quality.{want} Reply with a single JSON object with "
            f"exactly the fields {names}, and nothing else.")


def document_prompt(chunk: str, name: str) -> str:
    """Ask for one question answered by the passage, and its answer, as {"question": ..., "answer": ...}."""
    return (f"Read this passage from {name}:\n\n\"\"\"\n{chunk}\n\"\"\"\n\nWrite one question that a reader might "
            f"ask and that this passage answers, and its answer, using only facts stated in the passage. Reply with a "
            f'single JSON object: {{"question": "...", "answer": "..."}}')


def seed_jobs(seeds: list[Record], kind: str, k: int, seed: int,
              labels: list[str] | None = None) -> Callable[[int], Job]:
    """Job i shows k random seed rows; with `labels` it asks for label i mod the label set (balance)."""
    k = max(1, min(k, len(seeds)))

    def job(i: int) -> Job:
        rng = random.Random(f"{seed}:{i}")
        label = labels[i % len(labels)] if labels else None
        with_label = [r for r in seeds if label is not None and r.data["label"] == label]
        if with_label:  # one example of the wanted label, the others from anywhere
            first = rng.choice(with_label)
            examples = [first] + rng.sample([r for r in seeds if r is not first], k - 1)
            rng.shuffle(examples)
        else:
            examples = rng.sample(seeds, k)
        source = {"mode": "seeds", "seeds": [f"{r.source}:{r.line}" for r in examples]}
        if label is not None:
            source["label"] = label
        return Job([{"role": "user", "content": seed_prompt(examples, kind, label)}], kind, source)

    return job


def document_jobs(documents: list[Document], chunk_chars: int) -> Callable[[int], Job]:
    """Job i asks about chunk i of all documents' chunks in order, starting over when they run out."""
    chunks = [(doc.name, n, piece) for doc in documents for n, piece in enumerate(chunk_text(doc.text, chunk_chars))]

    def job(i: int) -> Job:
        name, n, piece = chunks[i % len(chunks)]
        return Job([{"role": "user", "content": document_prompt(piece, name)}], "instruction",
                   {"mode": "documents", "document": name, "chunk": n}, DOC_COLUMNS)

    return job


def synthesize(teacher: Teacher, *, seeds: list[Record] | None = None, documents: list[Document] | None = None,
               kind: str | None = None, n: int, existing: list[Record] = (), against: list[Record] = (),
               labels: list[str] | None = None, threshold: float = 0.85, max_chars: int | None = None,
               tokenizer=None, max_tokens: int | None = None, per_prompt_examples: int = 3, seed: int = 0,
               temperature: float = 0.7, max_new_tokens: int = 512, max_attempts: int | None = None,
               batch_size: int = 8, chunk_chars: int = CHUNK_CHARS,
               progress: Callable[[int, int], None] | None = None) -> SynthResult:
    """Ask the teacher until `n` rows pass every check or `max_attempts` (default 3×n) replies are spent.

    From `seeds` (self-instruct: new rows like k random seed rows) or from `documents` (question/answer
    instruction rows grounded in one chunk each). Every reply becomes a review row, checked against `existing`
    (duplicates), the rows generated before it (duplicates) and `against` (evaluation prompts: leakage).
    Classification rows keep to `labels` (default: the seeds' labels). Length: under MIN_WORDS words in the
    answer is too short; over `max_chars` characters, or `max_tokens` tokens of `tokenizer`, too long.
    `progress(attempts, passed)` is called after each batch.
    """
    if n < 1:
        raise DataError(f"asked for {n} rows", "ask for at least one row")
    kind, labels, make_job = _job_maker(seeds, documents, kind, labels, per_prompt_examples, seed, chunk_chars)
    checker = RowChecker(kind, existing, against, threshold, max_chars, tokenizer, max_tokens)
    budget = max_attempts if max_attempts is not None else 3 * n
    rows: list[dict[str, Any]] = []
    passed = 0
    while passed < n and len(rows) < budget:
        start = len(rows)
        jobs = [make_job(i) for i in range(start, start + min(batch_size, n - passed, budget - start))]
        replies = teacher.complete([j.conversation for j in jobs], max_new_tokens, temperature, seed + start)
        if len(replies) != len(jobs):
            raise DataError(f"teacher {teacher.name} gave {len(replies)} replies to {len(jobs)} prompts",
                            "a teacher must answer every prompt")
        batch = [_parse(job, reply, labels) for job, reply in zip(jobs, replies)]
        for job, (fields, problem, reply), checks in zip(jobs, batch, checker.check_batch(batch)):
            status = "rejected" if checks else "pending"
            passed += status == "pending"
            rows.append(review_row(kind, fields, status=status, checks=checks, origin="synth", teacher=teacher.name,
                                   source=job.source, raw=reply if problem else None))
        if progress:
            progress(len(rows), passed)
    return SynthResult(rows, _summary(rows, n, budget, kind, teacher.name, "documents" if documents else "seeds"))


def _job_maker(seeds, documents, kind, labels, per_prompt_examples, seed, chunk_chars):
    """(record type, label set or None, job i -> Job) for seed rows or documents; DataError when unusable."""
    if (seeds is None) == (documents is None):
        raise DataError("synthesize needs seed rows or documents, not both and not neither",
                        "pass --seeds FILE (self-instruct) or --documents FILE... (questions from documents)")
    if documents is not None:
        if kind not in (None, "instruction"):
            raise DataError(f"documents make instruction rows, not {kind} rows",
                            "drop the record type, or write rows from seed examples instead")
        if not documents:
            raise DataError("no documents to draw questions from", "give at least one non-empty text file")
        return "instruction", None, document_jobs(documents, chunk_chars)
    if not seeds:
        raise DataError("no seed rows to learn from", "the seed file has no usable rows; see its rejects")
    kinds = {r.kind for r in seeds}
    if len(kinds) > 1 or (kind is not None and kind not in kinds):
        raise DataError(f"seed rows are {', '.join(sorted(kinds))}, asked for {kind or 'one type'}",
                        "use seed rows of the one record type you want more of")
    kind = kinds.pop()
    if kind == "classification":
        labels = sorted(labels) if labels else sorted({r.data["label"] for r in seeds})
    else:
        labels = None
    return kind, labels, seed_jobs(seeds, kind, per_prompt_examples, seed, labels)


def _parse(job: Job, reply: str, labels: list[str] | None) -> tuple[dict[str, Any], str | None, str]:
    """(fields, format problem or None, reply): canonical fields when the reply converts, else what was parsed."""
    value = first_json_object(reply)
    if value is None:
        return {}, "no JSON object in the reply", reply
    data, problem = convert_row(job.kind, value, job.columns, labels)
    if problem:
        return {k: v for k, v in value.items() if v is not None}, problem, reply
    return data, None, reply


class RowChecker:
    """The checks every generated row goes through, remembering earlier rows for the duplicate check."""

    def __init__(self, kind: str, existing, against, threshold: float, max_chars: int | None, tokenizer,
                 max_tokens: int | None):
        self.kind, self.threshold = kind, threshold
        self.max_chars, self.tokenizer, self.max_tokens = max_chars, tokenizer, max_tokens
        self.existing, self.against = list(existing), list(against)
        self.existing_texts = [record_text(r.kind, r.data) for r in self.existing]
        self.against_texts = [record_text(r.kind, r.data, "prompt") for r in self.against]
        self.generated_texts: list[str] = []  # every earlier generated row that had the right format
        self.generated_numbers: list[int] = []  # its 1-based row number in the review file
        self.rows_seen = 0

    def check_batch(self, batch: list[tuple[dict[str, Any], str | None, str]]) -> list[list[dict[str, str]]]:
        """The failing checks of each (fields, format problem, reply) in the batch, in order."""
        from tunesmith.data.dedup import cross_matches

        checks: list[list[dict[str, str]]] = [[] for _ in batch]
        good = [i for i, (_, problem, _) in enumerate(batch) if problem is None]
        for i, (_, problem, _) in enumerate(batch):
            if problem is not None:
                checks[i].append({"check": "format", "detail": problem})
        texts = [record_text(self.kind, batch[i][0]) for i in good]
        prompts = [record_text(self.kind, batch[i][0], "prompt") for i in good]
        for j, i in enumerate(good):
            checks[i] += self._length(batch[i][0], texts[j])
        for j, match in _best(cross_matches(texts, self.existing_texts, self.threshold)).items():
            other = self.existing[match.b]
            checks[good[j]].append({"check": "duplicate_of_existing",
                                    "detail": f"{_how(match)} of {other.source}:{other.line}"})
        earlier = cross_matches(texts, self.generated_texts, self.threshold) if self.generated_texts else []
        within = [m for m in cross_matches(texts, texts, self.threshold) if m.b < m.a]
        numbers = self.generated_numbers + [self.rows_seen + i + 1 for i in good]
        shifted = [_Match(m.a, m.b + len(self.generated_texts), m.similarity, m.exact) for m in within]
        for j, match in _best(list(earlier) + shifted).items():
            checks[good[j]].append({"check": "duplicate_of_generated",
                                    "detail": f"{_how(match)} of generated row {numbers[match.b]}"})
        for j, match in _best(cross_matches(prompts, self.against_texts, self.threshold)).items():
            other = self.against[match.b]
            checks[good[j]].append({"check": "leakage",
                                    "detail": f"prompt is {_how(match)} of evaluation row {other.source}:{other.line}"})
        for j, i in enumerate(good):
            checks[i] += _quality(texts[j])
        self.generated_texts += texts
        self.generated_numbers = numbers
        self.rows_seen += len(batch)
        return checks

    def _length(self, fields: dict[str, Any], text: str) -> list[dict[str, str]]:
        name, answer = answer_part(self.kind, fields)
        words = len(answer.split())
        if words < MIN_WORDS:
            return [{"check": "length", "detail": f"too short: {words} word{'s' * (words != 1)} in {name} "
                                                  f"(at least {MIN_WORDS})"}]
        if self.max_chars is not None and len(text) > self.max_chars:
            return [{"check": "length", "detail": f"too long: {len(text)} characters (max {self.max_chars})"}]
        if self.tokenizer is not None and self.max_tokens is not None:
            tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if tokens > self.max_tokens:
                return [{"check": "length", "detail": f"too long: {tokens} tokens (max {self.max_tokens})"}]
        return []


@dataclass(frozen=True)
class _Match:
    a: int
    b: int
    similarity: float
    exact: bool


def _best(matches) -> dict[int, Any]:
    """For each row a, its best match: exact before near, then the highest similarity, then the first row."""
    best: dict[int, Any] = {}
    for m in matches:
        key = (not m.exact, -m.similarity, m.b)
        if m.a not in best or key < (not best[m.a].exact, -best[m.a].similarity, best[m.a].b):
            best[m.a] = m
    return dict(sorted(best.items()))


def _how(match) -> str:
    return "exact duplicate" if match.exact else f"near duplicate (similarity {match.similarity:.2f})"


def answer_part(kind: str, fields: dict[str, Any]) -> tuple[str, str]:
    """The field that carries the row's answer (or its text), and its value, for the length check."""
    if kind == "instruction":
        return "output", fields["output"]
    if kind == "chat":
        return "the last assistant turn", [m for m in fields["messages"] if m["role"] == "assistant"][-1]["content"]
    if kind == "preference":
        return "chosen", fields["chosen"]
    return "text", fields["text"]


def _quality(text: str) -> list[dict[str, str]]:
    from tunesmith.data.quality import find_pii, mask, text_issues

    checks = []
    for check, findings, show in (("quality", text_issues(text), lambda f: repr(f.text)),
                                  ("pii", find_pii(text), mask)):
        by_kind: dict[str, list[str]] = {}
        for finding in findings:
            by_kind.setdefault(finding.kind, []).append(show(finding))
        checks += [{"check": check, "detail": f"{kind}: {', '.join(shown[:5])}" + (" …" if len(shown) > 5 else "")}
                   for kind, shown in by_kind.items()]
    return checks


def _summary(rows: list[dict[str, Any]], n: int, budget: int, kind: str, teacher: str, mode: str) -> dict[str, Any]:
    statuses = Counter(r["_review"]["status"] for r in rows)
    checks = Counter(c["check"] for r in rows for c in {c["check"]: c for c in r["_review"]["checks"]}.values())
    return {"teacher": teacher, "mode": mode, "kind": kind, "asked": n, "attempts": len(rows),
            "max_attempts": budget, "pending": statuses["pending"], "rejected": statuses["rejected"],
            "checks": dict(sorted(checks.items())), "reached": statuses["pending"] >= n}
