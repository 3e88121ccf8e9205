"""Near-duplicate detection: `find_duplicates` on rows with planted duplicates, against a naive pairwise baseline.

Rows: sentence-level units from the five bundled datasets (../shared/datasets: sst2, banking77, alpaca, scitldr,
hh_rlhf), exact-duplicate units removed, then 2–4 random units of one dataset joined per base row (seeded, all base
rows distinct). Into each set we plant 5% exact copies (case and whitespace changed) and 5% near copies (1–3 word
substitutions, deletions or insertions, kept only when their true Jaccard is comfortably above the threshold), and
record each planted (source, copy) pair.

Each `find_duplicates` call runs in a fresh child process (this script re-invoked with `--child FILE`), so its peak
memory is its own: peak RSS during the call minus RSS just before it, in a process that has only imported tunesmith
and read the rows. The peak is the kernel's VmHWM after resetting it just before the call (/proc/self/clear_refs);
ru_maxrss can't be used, as a child inherits its parent's. The naive baseline computes the true Jaccard of every pair of shingle sets with
plain Python loops (shingling included in its time) and runs in this process.

    .venv/bin/python bench/dedup.py [--sizes 10000,100000] [--threshold 0.85] [--no-naive]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SEED = 20261122
PLANT_SHARE = 0.05            # of the total rows, for exact copies and again for near copies
UNIT_CHARS = (20, 400)        # sentence-level units outside this length range are dropped
UNITS_PER_ROW = (2, 4)
NAIVE_SIZE = 10_000
RESULT_PREFIX = "BENCH_RESULT "
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_HH_TURN = re.compile(r"\n\nHuman:|\n\nAssistant:")
PRECISION_DEF = ("precision = cluster pairs (every unordered pair of rows in one output cluster) that are a planted "
                 "pair, or whose true shingle Jaccard is >= threshold / all cluster pairs; recall = planted pairs whose "
                 "two rows are in the same cluster / planted pairs")


# ---------------------------------------------------------------- rows

def read_jsonl(name: str) -> list[dict]:
    """Every row of every .jsonl file of one bundled dataset (files in name order)."""
    rows = []
    for path in sorted((DATASETS / name).glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            rows.extend(json.loads(line) for line in fh if line.strip())
    return rows


def sentences(text: str) -> list[str]:
    """Split on sentence ends and line breaks; keep pieces of UNIT_CHARS length."""
    pieces = (p.strip() for p in _SENTENCE.split(text))
    return [p for p in pieces if UNIT_CHARS[0] <= len(p) <= UNIT_CHARS[1]]


def units_by_source() -> dict[str, list[str]]:
    """Sentence-level units per dataset, with duplicates (equal after near-duplicate normalization) removed."""
    from tunesmith.data.dedup import normalize

    raw = {
        "sst2": [u for r in read_jsonl("sst2") for u in sentences(r["text"])],
        "banking77": [u for r in read_jsonl("banking77") for u in sentences(r["text"])],
        "alpaca": [u for r in read_jsonl("alpaca") for f in ("instruction", "input", "output")
                   for u in sentences(r[f])],
        "scitldr": [u for r in read_jsonl("scitldr") for f in ("document", "summary") for u in sentences(r[f])],
        "hh_rlhf": [u for r in read_jsonl("hh_rlhf") for turn in _HH_TURN.split(r["prompt"])
                    for u in sentences(turn)],
    }
    seen, units = set(), {}
    for source, items in raw.items():
        units[source] = []
        for unit in items:
            key = " ".join(re.sub(r"[^\w\s]+", "", normalize(unit)).split())
            if key and key not in seen:
                seen.add(key)
                units[source].append(unit)
    return units


def base_rows(units: dict[str, list[str]], count: int, rng: random.Random) -> list[str]:
    """`count` distinct rows, each 2–4 random units of one dataset (datasets drawn in proportion to their units)."""
    from tunesmith.data.dedup import normalize

    sources = sorted(units)
    weights = [len(units[s]) for s in sources]
    rows, seen = [], set()
    while len(rows) < count:
        pool = units[rng.choices(sources, weights)[0]]
        row = " ".join(rng.sample(pool, rng.randint(*UNITS_PER_ROW)))
        if normalize(row) not in seen:
            seen.add(normalize(row))
            rows.append(row)
    return rows


def exact_copy(text: str, rng: random.Random) -> str:
    """The same text up to case and whitespace (so normalize() is equal)."""
    from tunesmith.data.dedup import normalize

    words = text.split()
    style = rng.randrange(4)
    if style == 0:
        words = [w.upper() for w in words]
    elif style == 1:
        words = [w.lower() if rng.random() < 0.5 else w.upper() for w in words]
    elif style == 2:
        words = [w.capitalize() for w in words]
    seps = [rng.choice([" ", "  ", "\n", "\t", " \n "]) for _ in words]
    copy = "".join(w + s for w, s in zip(words, seps)).strip() + rng.choice(["", " ", "\n"])
    return copy if normalize(copy) == normalize(text) else "  " + text + " \n"


def near_copy(text: str, vocab: list[str], min_sim: float, rng: random.Random) -> tuple[str, float, int] | None:
    """`text` with 1–3 word edits (substitute, delete, insert) and true Jaccard ≥ min_sim, or None if none found."""
    from tunesmith.data.dedup import normalize, shingles

    source = shingles(text)
    for attempt in range(12):
        edits = max(1, rng.randint(1, 3) - attempt // 4)
        words = text.split()
        for _ in range(edits):
            op, at = rng.randrange(3), rng.randrange(len(words))
            if op == 0:
                words[at] = rng.choice(vocab)
            elif op == 1 and len(words) > 3:
                del words[at]
            else:
                words.insert(at, rng.choice(vocab))
        copy = " ".join(words)
        mine = shingles(copy)
        sim = len(source & mine) / len(source | mine)
        if sim >= min_sim and normalize(copy) != normalize(text):
            return copy, sim, edits
    return None


def build_set(pool: list[str], vocab: list[str], total: int, min_sim: float, seed: int) -> dict:
    """`total` rows (shuffled): base rows, 5% exact copies and 5% near copies; planted pairs as final indices."""
    rng = random.Random(seed)
    n_plant = round(total * PLANT_SHARE)
    base = pool[:total - 2 * n_plant]
    sources = rng.sample(range(len(base)), len(base))
    rows, pairs, sims, edits = list(base), [], [], []
    for src in sources:
        if len(pairs) == n_plant:
            break
        rows.append(exact_copy(base[src], rng))
        pairs.append((src, len(rows) - 1, "exact"))
    for src in sources[n_plant:]:
        if len(pairs) == 2 * n_plant:
            break
        made = near_copy(base[src], vocab, min_sim, rng)
        if made:
            rows.append(made[0])
            pairs.append((src, len(rows) - 1, "near"))
            sims.append(made[1])
            edits.append(made[2])
    order = list(range(len(rows)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    planted = [(min(where[a], where[b]), max(where[a], where[b]), kind) for a, b, kind in pairs]
    return {"rows": [rows[i] for i in order], "planted": planted, "near_sims": sims, "near_edits": edits}


# ---------------------------------------------------------------- measuring

def child(path: str, threshold: float) -> None:
    """Run find_duplicates on the rows in `path` and print one JSON result line (time, memory, clusters)."""
    import psutil

    from tunesmith.data.dedup import find_duplicates

    with open(path, encoding="utf-8") as fh:
        rows = json.load(fh)
    rss_before = psutil.Process().memory_info().rss
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    wall0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    dups = find_duplicates(rows, threshold=threshold)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak = vm_hwm_bytes()
    print(RESULT_PREFIX + json.dumps({
        "seconds": wall, "cpu_per_wall": cpu / wall, "load_begin": load0, "load_end": os.getloadavg()[0],
        "peak_delta_mb": (peak - rss_before) / 2**20, "rss_before_mb": rss_before / 2**20, "clusters": dups.clusters, "exact_groups": len(dups.exact_groups),
        "near_clusters": len(dups.near_clusters())}))


def vm_hwm_bytes() -> int:
    """This process's peak RSS since start or the last reset (Linux /proc/self/status VmHWM)."""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def run_child(rows: list[str], threshold: float) -> dict:
    """find_duplicates in a fresh process; its parsed result line."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as fh:
        json.dump(rows, fh, ensure_ascii=False)
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", fh.name, "--threshold", str(threshold)],
                              capture_output=True, text=True, check=True)
    finally:
        os.unlink(fh.name)
    line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):])


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def score(rows: list[str], clusters: list[list[int]], planted: list[tuple[int, int, str]], threshold: float) -> dict:
    """Precision and recall of `clusters` against the planted pairs (see PRECISION_DEF)."""
    from tunesmith.data.dedup import normalize, shingles

    cluster_of = {i: c for c, members in enumerate(clusters) for i in members}
    planted_set = {(a, b) for a, b, _ in planted}
    total = correct = 0
    for members in clusters:
        for x, i in enumerate(members):
            for j in members[x + 1:]:
                total += 1
                correct += (i, j) in planted_set or normalize(rows[i]) == normalize(rows[j]) \
                    or jaccard(shingles(rows[i]), shingles(rows[j])) >= threshold
    found = {kind: 0 for kind in ("exact", "near")}
    for a, b, kind in planted:
        found[kind] += a in cluster_of and cluster_of.get(b) == cluster_of[a]
    counts = {kind: sum(k == kind for _, _, k in planted) for kind in found}
    return {"cluster_pairs": total, "precision": correct / total if total else 1.0,
            "recall": sum(found.values()) / len(planted), "recall_exact": found["exact"] / counts["exact"],
            "recall_near": found["near"] / counts["near"]}


def naive(rows: list[str], threshold: float) -> dict:
    """True Jaccard of every pair of shingle sets (plain loops); the pairs at or above the threshold."""
    from tunesmith.data.dedup import normalize, shingles

    wall0 = time.perf_counter()
    sets = [shingles(t) for t in rows]
    sizes = [len(s) for s in sets]
    shingled = time.perf_counter() - wall0
    hits = []
    for i in range(len(sets)):
        a, la = sets[i], sizes[i]
        for j in range(i + 1, len(sets)):
            inter = len(a & sets[j])
            union = la + sizes[j] - inter
            if union and inter / union >= threshold:
                hits.append((i, j))
    hits += [(i, j) for i, j in _exact_pairs(rows, normalize) if not sets[i]]  # rows with no shingles
    return {"seconds": time.perf_counter() - wall0, "shingle_seconds": shingled, "pairs": hits}


def _exact_pairs(rows: list[str], normalize) -> list[tuple[int, int]]:
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(normalize(row), []).append(i)
    return [(g[0], j) for g in groups.values() for j in g[1:]]


def components(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components (size ≥ 2, ascending, ordered by first member) of an edge list on n nodes."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = find(i), find(j)
        parent[max(ri, rj)] = min(ri, rj)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return sorted((c for c in comps.values() if len(c) > 1), key=lambda c: c[0])


# ---------------------------------------------------------------- report

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated total row counts")
    parser.add_argument("--threshold", type=float, default=0.85)
    parser.add_argument("--no-naive", action="store_true", help="skip the pairwise baseline on the 10k set")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.threshold)

    sizes = [int(s) for s in args.sizes.split(",")]
    min_sim = args.threshold + 0.4 * (1 - args.threshold)
    print(f"load average at start: {os.getloadavg()}; threshold {args.threshold}; "
          f"planted near copies need true Jaccard >= {min_sim:.3f}", flush=True)
    units = units_by_source()
    rng = random.Random(SEED)
    pool = base_rows(units, max(max(sizes), 100_000), rng)
    vocab = sorted({w for row in pool[:20_000] for w in row.split() if w.isalpha()})
    lengths = [len(r) for r in pool]
    print(f"units per dataset: { {k: len(v) for k, v in units.items()} }; {len(pool)} distinct base rows, chars "
          f"mean {statistics.mean(lengths):.0f}, median {statistics.median(lengths):.0f}, "
          f"min {min(lengths)}, max {max(lengths)}", flush=True)

    table = []
    for size in sizes:
        data = build_set(pool, vocab, size, min_sim, SEED + size)
        rows, planted = data["rows"], data["planted"]
        sims = data["near_sims"]
        print(f"\n{size} rows: {sum(k == 'exact' for *_, k in planted)} exact and {len(sims)} near copies planted; "
              f"near copies' true Jaccard min {min(sims):.3f}, median {statistics.median(sims):.3f}; edits "
              f"1/2/3: {[data['near_edits'].count(e) for e in (1, 2, 3)]}", flush=True)
        result = run_child(rows, args.threshold)
        quality = score(rows, result["clusters"], planted, args.threshold)
        print(f"find_duplicates: {result['seconds']:.1f} s (cpu/wall {result['cpu_per_wall']:.2f}, load "
              f"{result['load_begin']:.2f} -> {result['load_end']:.2f}), peak RSS +{result['peak_delta_mb']:.0f} MB "
              f"over {result['rss_before_mb']:.0f} MB; {len(result['clusters'])} clusters, "
              f"{result['near_clusters']} near; {quality}", flush=True)
        entry = {"size": size, **result, **quality, "naive": None}
        if size == NAIVE_SIZE and not args.no_naive:
            entry["naive"] = run_naive(rows, args.threshold, result["clusters"])
        table.append(entry)
    print("\n" + PRECISION_DEF)
    print_table(table)


def run_naive(rows: list[str], threshold: float, clusters: list[list[int]]) -> dict:
    """The pairwise baseline, and how find_duplicates' clusters compare with the exhaustive answer."""
    print("naive pairwise ...", flush=True)
    out = naive(rows, threshold)
    truth = components(len(rows), out["pairs"])
    cluster_of = {i: c for c, members in enumerate(clusters) for i in members}
    found = sum(i in cluster_of and cluster_of.get(j) == cluster_of[i] for i, j in out["pairs"])
    out.update(same_clusters=truth == clusters, true_pairs=len(out["pairs"]),
               true_pair_recall=found / len(out["pairs"]) if out["pairs"] else 1.0)
    print(f"naive: {out['seconds']:.1f} s ({out['shingle_seconds']:.1f} s shingling); {len(out['pairs'])} pairs "
          f">= threshold, {out['true_pair_recall']:.4f} of them in one find_duplicates cluster; identical clusters: "
          f"{out['same_clusters']}", flush=True)
    del out["pairs"]
    return out


def print_table(table: list[dict]) -> None:
    print("\n| rows | method | time (s) | peak memory (MB) | cluster pairs | precision | recall (all / exact / near) "
          "| speed-up |")
    print("|---:|---|---:|---:|---:|---:|---|---:|")
    for e in table:
        recall = f"{e['recall']:.4f} / {e['recall_exact']:.4f} / {e['recall_near']:.4f}"
        speed = f"{e['naive']['seconds'] / e['seconds']:.0f}×" if e["naive"] else ""
        print(f"| {e['size']:,} | find_duplicates | {e['seconds']:.1f} | {e['peak_delta_mb']:.0f} | "
              f"{e['cluster_pairs']:,} | {e['precision']:.4f} | {recall} | {speed} |")
        if e["naive"]:
            n = e["naive"]
            print(f"| {e['size']:,} | naive pairwise | {n['seconds']:.1f} | – | {n['true_pairs']:,} pairs ≥ t | exact "
                  f"| recall of these by find_duplicates: {n['true_pair_recall']:.4f}; same clusters: "
                  f"{'yes' if n['same_clusters'] else 'no'} | 1× |")


if __name__ == "__main__":
    main()
