"""Exact and near-duplicate detection: within one set of texts, and between two (train/eval leakage).

Two texts are *exact* duplicates when `normalize()` makes them equal (Unicode NFKC, case-folded, whitespace
collapsed). They are *near* duplicates when the Jaccard similarity of their character 5-gram sets (`shingles()`,
taken after also removing punctuation) is at least a threshold.

How: texts with the same near-duplicate form are linked directly. For the distinct forms, MinHash signatures
(numpy, vectorized) go through LSH banding to propose candidate pairs; every candidate is then checked with the true
Jaccard of its shingle sets, so a reported pair is never a MinHash estimate. Union-find turns pairs into clusters.
The same input always gives the same output: shingle hashes are a fixed 64-bit polynomial hash with a splitmix64
finalizer (never Python's salted `hash()`), and the MinHash permutations come from `seed`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

__all__ = ["CrossMatch", "Duplicates", "cross_matches", "find_duplicates", "normalize", "shingles"]

SHINGLE_SIZE = 5            # characters per shingle
MIN_CANDIDATE_PROB = 0.95   # LSH banding: chance that a pair at exactly the threshold becomes a candidate
CHUNK_CHARS = 1 << 13       # characters per MinHash chunk: bounds the (num_perm × shingles) work array (8 MB)
_U64 = np.uint64
_POLY = _U64(0x100000001B3)         # polynomial base for shingle hashes
_LEN_TAG = _U64(0x9E3779B97F4A7C15)  # mixes the shingle length in, so a short text's shingle differs from a 5-gram
_MASK32 = _U64(0xFFFFFFFF)
_PUNCT = re.compile(r"[^\w\s]+")


def normalize(text: str) -> str:
    """The form under which two texts are exact duplicates: NFKC, case-folded, whitespace collapsed, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _near_form(text: str) -> str:
    """`normalize()` with punctuation and symbols removed (whitespace collapsed again): what shingles are cut from."""
    return " ".join(_PUNCT.sub("", normalize(text)).split())


def shingles(text: str, n: int = SHINGLE_SIZE) -> set[int]:
    """The text's character n-grams (after near-duplicate normalization) as stable 64-bit hashes.

    A text shorter than `n` characters gives one shingle of the whole text; an empty one gives an empty set.
    """
    hashes, _ = _gram_hashes([_near_form(text)], n)
    return set(hashes.tolist())


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads every input bit over the 64-bit output (uint64 arithmetic wraps)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _gram_hashes(forms: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every n-gram of every form (in order, repeats kept), and per-form offsets into that array."""
    if n < 1:
        raise ValueError(f"shingle size n must be at least 1, got {n}")
    lengths = np.fromiter(map(len, forms), dtype=np.int64, count=len(forms))
    counts = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))
    offsets = np.zeros(len(forms) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    if total == 0:
        return np.zeros(0, dtype=_U64), offsets
    codes = np.frombuffer("".join(forms).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(_U64)
    row = np.repeat(np.arange(len(forms)), counts)
    first_char = np.cumsum(lengths) - lengths
    start = first_char[row] + (np.arange(total) - offsets[:-1][row])
    width = np.minimum(lengths[row], n)
    hashes = np.empty(total, dtype=_U64)
    full = width == n
    if full.any():  # every n-gram start in the joined text by slicing, then the ones inside one form
        rolling = codes[:len(codes) - n + 1].copy()
        for k in range(1, n):
            rolling *= _POLY
            rolling += codes[k:len(codes) - n + 1 + k]
        hashes[full] = rolling[start[full]]
    if not full.all():  # forms shorter than n: one shingle of the whole form
        short_start, short_width = start[~full], width[~full]
        short = np.zeros(len(short_start), dtype=_U64)
        for k in range(n - 1):
            take = k < short_width
            short = np.where(take, short * _POLY + codes[np.where(take, short_start + k, 0)], short)
        hashes[~full] = short
    return _mix64(hashes + width.astype(_U64) * _LEN_TAG), offsets


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers (odd) and offsets of `num_perm` multiply-add-shift hash functions on 32-bit keys."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, size=num_perm, dtype=_U64, endpoint=False) | _U64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=_U64, endpoint=False)
    return a, b


def _signatures(forms: Sequence[str], n: int, num_perm: int, seed: int, progress: bool) -> np.ndarray:
    """MinHash signatures, shape (len(forms), num_perm) uint32; every form must have at least one shingle.

    Permutation i of a 32-bit shingle key x is (a_i·x + b_i mod 2^64) >> 32. The shift is monotone, so it is taken
    after the minimum, on the small result rather than on the (num_perm × shingles) array.
    """
    a, b = _permutations(num_perm, seed)
    out = np.empty((len(forms), num_perm), dtype=np.uint32)
    bounds = _chunk_bounds(forms, CHUNK_CHARS)
    with tqdm(total=len(forms), desc="MinHash", unit="text", disable=not progress) as bar:
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            hashes, offsets = _gram_hashes(forms[lo:hi], n)
            keys = (hashes ^ (hashes >> _U64(32))) & _MASK32
            block = max(1, CHUNK_CHARS * num_perm // len(keys))  # a very long text: fewer permutations at a time
            for p in range(0, num_perm, block):
                work = np.multiply.outer(a[p:p + block], keys)
                work += b[p:p + block, None]
                mins = np.minimum.reduceat(work, offsets[:-1], axis=1)
                out[lo:hi, p:p + block] = (mins >> _U64(32)).T
            bar.update(hi - lo)
    return out


def _chunk_bounds(forms: Sequence[str], max_chars: int) -> list[int]:
    """Split points so that each chunk of forms holds about `max_chars` characters (at least one form each)."""
    bounds, size = [0], 0
    for i, form in enumerate(forms):
        if size and size + len(form) > max_chars:
            bounds.append(i)
            size = 0
        size += len(form)
    if bounds[-1] != len(forms):
        bounds.append(len(forms))
    return bounds


def _band_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): the most rows per band that still make a pair at the threshold a candidate with
    probability ≥ MIN_CANDIDATE_PROB. Candidates are verified, so a false candidate costs time, a miss costs recall.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= MIN_CANDIDATE_PROB:
            best = (bands, rows)
    return best


def _bucket_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j), i < j, of positions whose keys are equal."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    breaks = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    ends = np.repeat(np.append(breaks, len(keys)), np.diff(np.concatenate(([0], breaks, [len(keys)]))))
    partners = ends - np.arange(len(keys)) - 1        # later positions in the same bucket
    left = np.repeat(np.arange(len(keys)), partners)
    step = np.arange(len(left)) - np.repeat(np.cumsum(partners) - partners, partners)
    i, j = order[left], order[left + 1 + step]
    return np.minimum(i, j), np.maximum(i, j)


def _lsh_candidates(sig: np.ndarray, threshold: float) -> np.ndarray:
    """Candidate pairs of signature rows sharing at least one LSH band, as sorted unique codes i * len(sig) + j."""
    bands, rows = _band_params(threshold, sig.shape[1])
    found = [np.zeros(0, dtype=np.int64)]
    for band in range(bands):
        key = np.zeros(len(sig), dtype=_U64)
        for col in range(band * rows, (band + 1) * rows):
            key = _mix64(key * _POLY + sig[:, col].astype(_U64))
        i, j = _bucket_pairs(key)
        found.append(np.unique(i.astype(np.int64) * len(sig) + j))
    return np.unique(np.concatenate(found))


class _ShingleStore:
    """Sorted unique shingle hashes of the forms that need a true Jaccard, computed in batches on demand."""

    def __init__(self, forms: Sequence[str], n: int):
        self.forms, self.n, self.sets = forms, n, {}

    def load(self, ids: Sequence[int]) -> None:
        """Compute the shingle arrays of `ids` not yet held."""
        todo = sorted({int(i) for i in ids} - self.sets.keys())
        for lo in range(0, len(todo), 4096):
            batch = todo[lo:lo + 4096]
            hashes, offsets = _gram_hashes([self.forms[i] for i in batch], self.n)
            row = np.repeat(np.arange(len(batch)), np.diff(offsets))
            order = np.lexsort((hashes, row))
            hashes, row = hashes[order], row[order]
            keep = np.ones(len(hashes), dtype=bool)
            keep[1:] = (hashes[1:] != hashes[:-1]) | (row[1:] != row[:-1])
            counts = np.bincount(row[keep], minlength=len(batch))
            for form, arr in zip(batch, np.split(hashes[keep], np.cumsum(counts)[:-1])):
                self.sets[form] = arr

    def jaccard(self, f: int, g: int) -> float:
        """True Jaccard similarity of two forms' shingle sets (0.0 when either has none)."""
        if f not in self.sets or g not in self.sets:
            self.load((f, g))
        a, b = self.sets[f], self.sets[g]
        if not len(a) or not len(b):
            return 0.0
        if len(a) > len(b):
            a, b = b, a
        at = np.searchsorted(b, a)
        inter = int(np.count_nonzero(b[np.minimum(at, len(b) - 1)] == a))
        return inter / (len(a) + len(b) - inter)


def _near_pairs(forms: list[str], threshold: float, num_perm: int, seed: int, progress: bool,
                keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                ) -> tuple[list[tuple[int, int, float]], _ShingleStore]:
    """Pairs of distinct forms (f < g) whose true shingle Jaccard is ≥ threshold, with that Jaccard.

    `keep(f, g)` (arrays) can drop candidate pairs before they are verified.
    """
    _check_args(threshold, num_perm)
    store = _ShingleStore(forms, SHINGLE_SIZE)
    usable = [i for i, form in enumerate(forms) if form]
    if len(usable) < 2:
        return [], store
    sig = _signatures([forms[i] for i in usable], SHINGLE_SIZE, num_perm, seed, progress)
    codes = _lsh_candidates(sig, threshold)
    ids = np.asarray(usable, dtype=np.int64)
    f, g = ids[codes // len(usable)], ids[codes % len(usable)]
    if keep is not None:
        mask = keep(f, g)
        f, g = f[mask], g[mask]
    store.load(np.concatenate((f, g)))
    pairs = []
    for x, y in tqdm(zip(f.tolist(), g.tolist()), total=len(f), desc="verify", unit="pair", disable=not progress):
        sim = store.jaccard(x, y)
        if sim >= threshold:
            pairs.append((x, y, sim))
    return pairs, store


def _check_args(threshold: float, num_perm: int) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be at least 1, got {num_perm}")


def _forms_of(texts: Sequence[str]) -> tuple[list[str], list[str], list[int]]:
    """normalize() of each text, the distinct near-duplicate keys, and each text's key index.

    A text with no shingles (empty after removing punctuation) gets a key of its own exact form, so it can only
    match its exact duplicates: NUL never survives punctuation removal, so such keys can't clash with real forms.
    """
    exact = [normalize(t) for t in texts]
    index: dict[str, int] = {}
    form_of = []
    for e in exact:
        key = " ".join(_PUNCT.sub("", e).split()) or "\x00" + e
        form_of.append(index.setdefault(key, len(index)))
    forms = [key if not key.startswith("\x00") else "" for key in index]
    return exact, forms, form_of


@dataclass
class Duplicates:
    """What `find_duplicates` found, as indices into its input.

    exact_groups: indices with equal `normalize()` (size ≥ 2, ascending, ordered by first member).
    clusters: connected components of pairs with shingle Jaccard ≥ threshold, exact duplicates included
      (size ≥ 2, ascending, ordered by first member).
    similarity: for every cluster member m other than the first, (e, m) → the highest true Jaccard between m and
      any earlier member e of its cluster (ties: the smallest e). Exact duplicates have 1.0.
    """

    exact_groups: list[list[int]]
    clusters: list[list[int]]
    similarity: dict[tuple[int, int], float]

    def duplicate_of(self) -> dict[int, int]:
        """Each non-first cluster member → the first member of its cluster (the one a cleaner keeps)."""
        return {m: cluster[0] for cluster in self.clusters for m in cluster[1:]}

    def near_clusters(self) -> list[list[int]]:
        """The clusters that hold at least two different `normalize()` forms (not just one exact group)."""
        exact = {tuple(group) for group in self.exact_groups}
        return [cluster for cluster in self.clusters if tuple(cluster) not in exact]


def find_duplicates(texts: Sequence[str], threshold: float = 0.85, num_perm: int = 128, seed: int = 1,
                    progress: bool = False) -> Duplicates:
    """Exact-duplicate groups and near-duplicate clusters (shingle Jaccard ≥ `threshold`) among `texts`."""
    exact, forms, form_of = _forms_of(texts)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(exact):
        groups[e].append(i)
    exact_groups = [g for g in groups.values() if len(g) > 1]

    members: list[list[int]] = [[] for _ in forms]
    for i, f in enumerate(form_of):
        members[f].append(i)
    pairs, store = _near_pairs(forms, threshold, num_perm, seed, progress)
    parent = list(range(len(texts)))
    for rows in members:
        for i in rows[1:]:
            _union(parent, rows[0], i)
    for f, g, _ in pairs:
        _union(parent, members[f][0], members[g][0])
    comps: dict[int, list[int]] = defaultdict(list)
    for i in range(len(texts)):
        comps[_find(parent, i)].append(i)
    clusters = sorted((c for c in comps.values() if len(c) > 1), key=lambda c: c[0])

    known = {(f, g): s for f, g, s in pairs}
    similarity = {}
    for cluster in clusters:
        similarity.update(_best_earlier(cluster, form_of, members, store, known))
    return Duplicates(exact_groups, clusters, similarity)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union(parent: list[int], i: int, j: int) -> None:
    ri, rj = _find(parent, i), _find(parent, j)
    if ri != rj:
        parent[max(ri, rj)] = min(ri, rj)


def _best_earlier(cluster: list[int], form_of: list[int], members: list[list[int]], store: _ShingleStore,
                  known: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """(e, m) → Jaccard for each non-first member m: its most similar earlier member e (ties: smallest e)."""
    out = {}
    seen: list[int] = []  # forms met so far, in order of their first member
    for m in cluster:
        f = form_of[m]
        if seen:
            best = (-1.0, 0)
            for g in seen:
                if g == f:
                    sim = 1.0
                else:
                    key = (min(f, g), max(f, g))
                    if key not in known:
                        known[key] = store.jaccard(*key)
                    sim = known[key]
                if sim > best[0]:
                    best = (sim, members[g][0])
            out[(best[1], m)] = best[0]
        if f not in seen:
            seen.append(f)
    return out


@dataclass(frozen=True)
class CrossMatch:
    """A text of `texts_a` (index `a`) that duplicates one of `texts_b` (index `b`)."""

    a: int
    b: int
    similarity: float  # true shingle Jaccard; 1.0 for exact duplicates
    exact: bool        # normalize() equal


def cross_matches(texts_a: Sequence[str], texts_b: Sequence[str], threshold: float = 0.85, num_perm: int = 128,
                  seed: int = 1) -> list[CrossMatch]:
    """Every (a, b) pair that is an exact duplicate or has shingle Jaccard ≥ `threshold`, sorted by (a, b).

    For train/eval leakage (a = training rows, b = evaluation rows) and for checking new rows against existing ones.
    """
    exact, forms, form_of = _forms_of(list(texts_a) + list(texts_b))
    n_a = len(texts_a)
    side_a: list[list[int]] = [[] for _ in forms]
    side_b: list[list[int]] = [[] for _ in forms]
    for i, f in enumerate(form_of):
        (side_a[f] if i < n_a else side_b[f]).append(i)
    in_a = np.array([bool(s) for s in side_a], dtype=bool)
    in_b = np.array([bool(s) for s in side_b], dtype=bool)

    def across(f: np.ndarray, g: np.ndarray) -> np.ndarray:
        return (in_a[f] & in_b[g]) | (in_b[f] & in_a[g])

    pairs, _ = _near_pairs(forms, threshold, num_perm, seed, False, keep=across)
    found: dict[tuple[int, int], float] = {}
    for f in range(len(forms)):
        for a in side_a[f]:
            for b in side_b[f]:
                found[(a, b)] = 1.0
    for f, g, sim in pairs:
        for x, y in ((f, g), (g, f)):
            for a in side_a[x]:
                for b in side_b[y]:
                    found[(a, b)] = sim
    return [CrossMatch(a, b - n_a, sim, exact[a] == exact[b]) for (a, b), sim in sorted(found.items())]
