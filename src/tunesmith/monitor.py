"""`tunesmith monitor LOG [--run RUN]`: what a served model did, and whether its inputs drifted from its training data.

From the request log (`tunesmith.serve.requestlog`): requests, error rate by code, latency percentiles (queue,
time to first token, end to end) and throughput per time window. Against the run's own training rows (RUN/data/,
never the recipe's files): the input-length distribution (population stability index), an embedding shift with
the bundled MiniLM (MMD² with a seeded permutation p-value; needs `serve --log-content`) and, for classifiers, the
predicted labels against the training labels (chi-square) and the share of low-confidence predictions. It ends
with a verdict: "no drift" or "retrain recommended", with the reasons and their numbers.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

from tunesmith.errors import RunError, TunesmithError

ALPHA = 0.01              # a test's p-value below this counts as drift
PSI_BANDS = (0.1, 0.25)   # population stability index: < 0.1 stable, 0.1–0.25 moderate shift, ≥ 0.25 shift
LOW_CONFIDENCE = 0.6      # a prediction whose probability is below this is "low confidence"
LOW_CONFIDENCE_SHARE = 0.3  # more low-confidence predictions than this share is a reason to retrain
SAMPLE = 200              # texts per side in the embedding test (sampled with SEED)
PERMUTATIONS = 500        # label shuffles for the embedding test's p-value
MIN_TEXTS = 20            # fewer served inputs than this: the drift tests say so and are skipped
SEED = 0
ENCODER = "minilm"        # the embedding model (tunesmith.model.resolve_model)
MAX_TOKENS = 128          # texts are cut to this many tokens for the embedding
PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("queue_s", "ttft_s", "e2e_s")
WINDOWS_MIN = (1, 2, 5, 10, 15, 30, 60, 120, 360, 720, 1440)  # the automatic window is the first giving ≤ 24


def monitor(log: str | Path, run: str | Path | None = None, since: float | None = None,
            window_min: float | None = None) -> dict[str, Any]:
    """The whole monitoring report as a dict (traffic, drift, verdict); TunesmithError for a bad log or run."""
    from tunesmith.serve.requestlog import read_requests

    rows = read_requests(log, since)
    if not rows:
        raise TunesmithError(f"{log}: no requests logged" + (" since the --since time" if since else ""),
                             "serve some requests first" + (", or give an earlier --since" if since else ""))
    run = _default_run(Path(log)) if run is None else Path(run).expanduser()
    report = {"log": str(log), "since": since, "traffic": traffic(rows, window_min)}
    report["drift"] = drift(rows, run) if run is not None else None
    report["verdict"] = verdict(report["drift"])
    return report


def _default_run(log: Path) -> Path | None:
    """RUN for a log at RUN/serve/requests.sqlite, else None."""
    parent = log.resolve().parent
    return parent.parent if parent.name == "serve" and (parent.parent / "data" / "data.json").is_file() else None


# ----------------------------------------------------------------------------------------------- traffic


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    if not values:
        return None
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


def latency_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For queue, ttft and e2e: the count and the PERCENTILES of the rows that have the value."""
    out = {}
    for key in LATENCIES:
        values = [r[key] for r in rows if isinstance(r[key], (int, float))]
        out[key] = {"n": len(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES}}
    return out


def traffic(rows: list[dict[str, Any]], window_min: float | None = None) -> dict[str, Any]:
    """Counts, error rate by code, latency percentiles and throughput, overall and per time window."""
    start, end = rows[0]["time"], rows[-1]["time"]
    span = max(end - start, 1e-9)
    errors = [r for r in rows if (r["status"] or 0) >= 400]
    by_code = Counter(r["error_code"] or str(r["status"]) for r in errors)
    window_min = window_min or next((w for w in WINDOWS_MIN if span / 60 / w <= 24), WINDOWS_MIN[-1])
    return {"requests": len(rows), "start": start, "end": end, "errors": len(errors),
            "error_rate": len(errors) / len(rows),
            "by_status": dict(sorted(Counter(r["status"] for r in rows).items(), key=lambda kv: str(kv[0]))),
            "by_code": {code: {"count": n, "rate": n / len(rows)} for code, n in by_code.most_common()},
            "by_model": dict(Counter(r["model"] for r in rows).most_common()),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in rows if r["finish_reason"]).most_common()),
            "latency": latency_table(rows),
            "requests_per_s": len(rows) / span if len(rows) > 1 else None,
            "tokens_per_s": _tokens(rows) / span if len(rows) > 1 else None,
            "window_min": window_min, "windows": windows(rows, window_min * 60)}


def _tokens(rows: list[dict[str, Any]]) -> int:
    return sum(r["completion_tokens"] or 0 for r in rows)


def windows(rows: list[dict[str, Any]], width_s: float) -> list[dict[str, Any]]:
    """Per window of `width_s` seconds from the first request: requests, errors, throughput, p50/p95 latencies.
    The last window is cut short where the log ends (at least 1 s), so its rates are per second of traffic seen."""
    start, end = rows[0]["time"], rows[-1]["time"]
    groups: dict[int, list] = {}
    for r in rows:
        groups.setdefault(int((r["time"] - start) // width_s), []).append(r)
    out = []
    last = max(groups)
    for index in range(last + 1):
        group = groups.get(index, [])
        lat = latency_table(group)
        seconds = width_s if index < last else min(width_s, max(end - (start + index * width_s), 1.0))
        out.append({"start": start + index * width_s, "minute": index * width_s / 60, "requests": len(group),
                    "errors": sum((r["status"] or 0) >= 400 for r in group), "seconds": seconds,
                    "requests_per_s": len(group) / seconds, "tokens_per_s": _tokens(group) / seconds,
                    **{f"{k[:-2]}_p{q}": lat[k][f"p{q}"] for k in ("ttft_s", "e2e_s") for q in (50, 95)}})
    return out


# ----------------------------------------------------------------------------------------------- drift


def drift(rows: list[dict[str, Any]], run: Path) -> dict[str, Any]:
    """Served inputs against the run's training rows: lengths (PSI), embeddings (MMD²), predicted labels (χ²)."""
    from tunesmith.data.snapshot import read_snapshot

    if not run.is_dir():
        raise RunError(f"{run}: no such run folder", "give --run the run folder that was served")
    snap = read_snapshot(run)
    train_texts = [t for t in (user_text(r.data, r.kind) for r in snap.train) if t]
    if not train_texts:
        raise RunError(f"{run / 'data' / 'train.jsonl'}: no training inputs to compare with",
                       "the run folder is damaged; train the run again")
    answered = _answered(rows, run)
    served = served_texts(answered)
    out: dict[str, Any] = {"run": str(run), "train_rows": len(train_texts), "answered": len(answered),
                           "content_logged": served is not None}
    lengths = [len(t) for t in served] if served is not None else _request_lengths(answered)
    out["length"] = length_drift([len(t) for t in train_texts], lengths, served is not None)
    if served is None:
        out["embedding"] = {"skipped": "no prompts in the log: start `tunesmith serve --log-content` to test "
                                       "the inputs' meaning"}
    elif len(served) < MIN_TEXTS:
        out["embedding"] = {"skipped": f"only {len(served)} served inputs logged; the test needs {MIN_TEXTS}"}
    else:
        out["embedding"] = embedding_drift(train_texts, served)
    if snap.kind == "classification" and snap.labels:
        out["labels"] = label_drift([r.data["label"] for r in snap.train], answered)
    return out


def _answered(rows: list[dict[str, Any]], run: Path) -> list[dict[str, Any]]:
    """The successful requests that this run answered (all successful ones when the log names no run that is it)."""
    ok = [r for r in rows if (r["status"] or 0) < 400]
    mine = [r for r in ok if r["run"] and _same(r["run"], run)]
    return mine or ok


def _same(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except (OSError, ValueError):
        return False


def user_text(data: Any, kind: str | None = None) -> str:
    """The user's side of a training record's data or of a logged prompt item: the text a client sends."""
    if isinstance(data, str):
        return data
    if isinstance(data, list):  # chat messages
        return "\n".join(m.get("content") or "" for m in data if isinstance(m, dict) and m.get("role") == "user")
    if not isinstance(data, dict):
        return ""
    if kind == "chat" or "messages" in data:
        return user_text(data.get("messages") or [])
    if "instruction" in data:
        return "\n".join(v for v in (data["instruction"], data.get("input")) if v)
    value = data.get("text", data.get("prompt", ""))
    return value if isinstance(value, str) else user_text(value)


def served_texts(rows: list[dict[str, Any]]) -> list[str] | None:
    """The served inputs, one per text (a classify request's list gives several); None when no prompt is logged."""
    prompts = [r["prompt"] for r in rows if r["prompt"] is not None]
    if not prompts:
        return None
    out = []
    for p in prompts:
        is_chat = isinstance(p, list) and p and all(isinstance(m, dict) for m in p)
        items = [p] if is_chat or not isinstance(p, list) else p
        out.extend(t for t in (user_text(item) for item in items) if t)
    return out


def _request_lengths(rows: list[dict[str, Any]]) -> list[float]:
    """Without content: each request's input_chars (per text for a classify request of several texts)."""
    return [r["input_chars"] / max(1, len(r["prediction"] or [])) for r in rows if r["input_chars"] is not None]


def length_drift(train: list[int], served: list[float], per_text: bool) -> dict[str, Any]:
    """Population stability index of served input lengths over ten bins cut at the training lengths' deciles, and
    the p-value of a χ² test that both samples share one distribution over those bins (PSI alone grows with
    sampling noise in small samples: about (bins − 1)·(1/n_served + 1/n_train))."""
    if len(served) < MIN_TEXTS:
        return {"skipped": f"only {len(served)} served input lengths; PSI needs {MIN_TEXTS}"}
    edges = sorted({percentile(train, q) for q in range(10, 100, 10)})
    train_counts, served_counts = _counts(train, edges), _counts(served, edges)
    train_share = [c / len(train) for c in train_counts]
    served_share = [c / len(served) for c in served_counts]
    value = psi(train_share, served_share)
    stat, p_value = homogeneity(train_counts, served_counts)
    band = "stable" if value < PSI_BANDS[0] else "moderate shift" if value < PSI_BANDS[1] else "shift"
    labels = [f"≤{edges[0]:.0f}"] + [f"{a:.0f}–{b:.0f}" for a, b in zip(edges, edges[1:])] + [f">{edges[-1]:.0f}"]
    return {"psi": value, "band": band, "chi2": stat, "p_value": p_value, "per_text": per_text,
            "n_train": len(train), "n_served": len(served),
            "train_median": percentile(train, 50), "served_median": percentile(served, 50),
            "bins": [{"bin": b, "train": t, "served": s} for b, t, s in zip(labels, train_share, served_share)]}


def _counts(values: list[float], edges: list[float]) -> list[int]:
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[next((i for i, e in enumerate(edges) if v <= e), len(edges))] += 1
    return counts


def psi(expected: list[float], actual: list[float], floor: float = 1e-4) -> float:
    """Σ (actual − expected) · ln(actual / expected) over bins, each share floored at `floor` (no log of 0)."""
    pairs = [(max(e, floor), max(a, floor)) for e, a in zip(expected, actual)]
    return float(sum((a - e) * math.log(a / e) for e, a in pairs))


def embedding_drift(train: list[str], served: list[str]) -> dict[str, Any]:
    """MMD² (Gaussian kernel, median bandwidth) between MiniLM embeddings of ≤ SAMPLE texts per side, with a
    permutation p-value (PERMUTATIONS shuffles, seeded) and the cosine distance between the two means."""
    import numpy as np

    rng = random.Random(SEED)
    a = rng.sample(train, min(SAMPLE, len(train)))
    b = rng.sample(served, min(SAMPLE, len(served)))
    x = embed_texts(a + b)
    stat, p_value = mmd_test(x[:len(a)], x[len(a):], PERMUTATIONS, SEED)
    ma, mb = x[:len(a)].mean(0), x[len(a):].mean(0)
    cosine = 1 - float(ma @ mb / (np.linalg.norm(ma) * np.linalg.norm(mb)))
    return {"mmd2": stat, "p_value": p_value, "mean_cosine_distance": cosine, "n_train": len(a), "n_served": len(b),
            "permutations": PERMUTATIONS, "seed": SEED, "encoder": ENCODER}


_ENCODER: list = []


def embed_texts(texts: list[str]):
    """L2-normalised mean-pooled MiniLM embeddings (numpy, texts × 384), with features' own embedding code."""
    import numpy as np

    from tunesmith.methods.classify import tokenize_text
    from tunesmith.methods.features import embed, load_encoder
    from tunesmith.model import load_tokenizer, resolve_model

    if not _ENCODER:  # loaded once per process
        source = resolve_model(ENCODER)
        _ENCODER.extend((load_encoder(source), load_tokenizer(source)))
    model, tokenizer = _ENCODER
    rows = [tokenize_text(tokenizer, t, MAX_TOKENS)[0] for t in texts]
    x = embed(model, rows, tokenizer.pad_token_id, "mean", batch_size=32, desc="embedding inputs")
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def mmd_test(x, y, permutations: int, seed: int) -> tuple[float, float]:
    """Unbiased MMD² of samples x and y (rows, Gaussian kernel at the median distance) and its permutation
    p-value: (1 + #{shuffles ≥ observed}) / (1 + permutations)."""
    import numpy as np

    z = np.concatenate([x, y]).astype(np.float64)
    sq = np.maximum((z * z).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2 * z @ z.T, 0)
    bandwidth = np.median(sq[np.triu_indices(len(z), 1)]) or 1.0
    kernel = np.exp(-sq / bandwidth)
    np.fill_diagonal(kernel, 0)
    n, m = len(x), len(y)

    def mmd2(first) -> float:
        mask = np.zeros(len(z), dtype=bool)
        mask[first] = True
        kxx = kernel[np.ix_(mask, mask)].sum() / (n * (n - 1))
        kyy = kernel[np.ix_(~mask, ~mask)].sum() / (m * (m - 1))
        return float(kxx + kyy - 2 * kernel[np.ix_(mask, ~mask)].sum() / (n * m))

    observed = mmd2(np.arange(n))
    rng = np.random.default_rng(seed)
    beats = sum(mmd2(rng.permutation(len(z))[:n]) >= observed for _ in range(permutations))
    return observed, (1 + beats) / (1 + permutations)


def label_drift(train_labels: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Predicted labels of the served texts against the training labels (χ² goodness of fit), and the share of
    predictions whose probability is below LOW_CONFIDENCE."""
    predictions = [p for r in rows for p in (r["prediction"] or []) if isinstance(p, dict) and "label" in p]
    if len(predictions) < MIN_TEXTS:
        return {"skipped": f"only {len(predictions)} logged predictions; the test needs {MIN_TEXTS}"}
    train = Counter(train_labels)
    served = Counter(str(p["label"]) for p in predictions)
    labels = sorted(train, key=lambda k: -train[k])
    observed = [served.get(k, 0) for k in labels]
    expected = [train[k] / len(train_labels) * len(predictions) for k in labels]
    unknown = sum(n for k, n in served.items() if k not in train)
    stat, p_value = chi_square(observed, expected)
    low = sum(1 for p in predictions if isinstance(p.get("probability"), (int, float))
              and p["probability"] < LOW_CONFIDENCE)
    return {"chi2": stat, "df": len(labels) - 1, "p_value": p_value, "n": len(predictions), "unknown_labels": unknown,
            "labels": [{"label": k, "train": train[k] / len(train_labels),
                        "served": served.get(k, 0) / len(predictions)} for k in labels],
            "low_confidence": low / len(predictions), "threshold": LOW_CONFIDENCE}


def homogeneity(first: list[int], second: list[int]) -> tuple[float, float]:
    """χ² test that two samples' counts over the same bins come from one distribution: (statistic, p-value)."""
    total_a, total_b = sum(first), sum(second)
    pooled = [(a + b) / (total_a + total_b) for a, b in zip(first, second)]
    keep = [i for i, p in enumerate(pooled) if p > 0]
    stat_a, _ = chi_square([first[i] for i in keep], [pooled[i] * total_a for i in keep])
    stat_b, _ = chi_square([second[i] for i in keep], [pooled[i] * total_b for i in keep])
    return stat_a + stat_b, chi_square_p(stat_a + stat_b, max(1, len(keep) - 1))


def chi_square(observed: list[int], expected: list[float]) -> tuple[float, float]:
    """Pearson's χ² statistic and p-value (scipy's when installed, else the Wilson–Hilferty approximation)."""
    stat = float(sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0))
    return stat, chi_square_p(stat, max(1, len(observed) - 1))


def chi_square_p(stat: float, df: int) -> float:
    """P(χ²_df ≥ stat): scipy's when installed, else the Wilson–Hilferty normal approximation."""
    try:
        from scipy.stats import chi2
    except ImportError:
        z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
        return 0.5 * math.erfc(z / math.sqrt(2))
    return float(chi2.sf(stat, df))


# ----------------------------------------------------------------------------------------------- verdict


def verdict(result: dict[str, Any] | None) -> dict[str, Any]:
    """"no drift" or "retrain recommended" with the reasons (each with its numbers); notes for what is only
    worth watching or was not tested."""
    if result is None:
        return {"verdict": "drift not checked", "reasons": [],
                "notes": ["no run folder: give --run RUN (the run that was served) to compare with its training data"]}
    reasons, notes = [], []
    length = result["length"]
    if "psi" in length:
        line = (f"input lengths: PSI {length['psi']:.3f}, χ² p = {length['p_value']:.2e} (median "
                f"{length['served_median']:.0f} chars served vs {length['train_median']:.0f} in training)")
        if length["psi"] >= PSI_BANDS[1] and length["p_value"] < ALPHA:
            reasons.append(f"{line}: PSI ≥ {PSI_BANDS[1]} and p < {ALPHA}")
        elif length["psi"] >= PSI_BANDS[0]:
            notes.append(f"{line}: a moderate shift ({PSI_BANDS[0]}–{PSI_BANDS[1]}), worth watching")
    emb = result["embedding"]
    if "p_value" in emb and emb["p_value"] < ALPHA:
        reasons.append(f"input meaning ({emb['encoder']} embeddings): MMD² {emb['mmd2']:.4f}, permutation "
                       f"p = {emb['p_value']:.4f} < {ALPHA}")
    labels = result.get("labels") or {}
    if "p_value" in labels and labels["p_value"] < ALPHA:
        reasons.append(f"predicted labels differ from the training labels: χ² {labels['chi2']:.1f}, "
                       f"df {labels['df']}, p = {labels['p_value']:.2e} < {ALPHA}")
    if "low_confidence" in labels and labels["low_confidence"] > LOW_CONFIDENCE_SHARE:
        reasons.append(f"{labels['low_confidence']:.0%} of predictions have probability < {LOW_CONFIDENCE} "
                       f"(more than {LOW_CONFIDENCE_SHARE:.0%})")
    notes += [f"{name}: {part['skipped']}" for name, part in (("input lengths", length), ("embedding", emb),
                                                               ("labels", labels)) if "skipped" in part]
    return {"verdict": "retrain recommended" if reasons else "no drift", "reasons": reasons, "notes": notes}


# ----------------------------------------------------------------------------------------------- terminal


def format_summary(report: dict[str, Any]) -> str:
    """The terminal summary: traffic, latency table, drift lines and the verdict."""
    from tunesmith.monitor_view import summary_lines

    return "\n".join(summary_lines(report))


def write_html(report: dict[str, Any], out: str | Path) -> Path:
    """Write the monitoring page (one offline HTML file) through a temporary renamed into place."""
    from tunesmith.artifacts import atomic_write
    from tunesmith.monitor_view import render_html

    atomic_write(out, render_html(report))
    return Path(out)
