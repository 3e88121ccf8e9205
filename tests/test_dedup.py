"""Exact and near-duplicate detection: normalization, shingles, clusters, similarity, cross matches."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from tunesmith.data.dedup import CrossMatch, Duplicates, cross_matches, find_duplicates, normalize, shingles

# Five unrelated ~40-word texts.
FOX = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch of his old wooden "
       "house, wondering whether the rain will come before the harvest is finished and the barn doors are "
       "finally closed for the long winter ahead.")
BANK = ("Please transfer the remaining balance of my savings account to the new checking account I opened last "
        "week, and send me a confirmation email with the reference number once the payment has cleared so I "
        "can update my personal budget spreadsheet tonight.")
PAPER = ("We propose a simple regularization method for training deep neural networks that penalizes the "
         "curvature of the loss surface, and we show on three image classification benchmarks that it improves "
         "generalization without adding noticeable cost to each optimizer step during training.")
RECIPE = ("Preheat the oven to two hundred degrees, whisk four eggs with a cup of sugar until pale and fluffy, fold "
          "in the sifted flour and melted butter, then pour the batter into a lined tin and bake for forty "
          "minutes until golden brown.")
TRAIN = ("The evening train to the coast was delayed by almost an hour because of a signal failure near the "
         "central station, so most passengers bought coffee at the kiosk and watched the departure board "
         "anxiously while the announcements repeated the same apology.")


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def edit_words(text: str, replacements: dict[int, str]) -> str:
    words = text.split()
    for at, word in replacements.items():
        words[at] = word
    return " ".join(words)


# ---------------------------------------------------------------- normalize and shingles

def test_normalize_nfkc_casefold_whitespace_keeps_punctuation():
    assert normalize("  Straße\t\tIS\n ﬁne,  ＡＢＣ!  ") == "strasse is fine, abc!"
    assert normalize("") == ""
    assert normalize(" \n\t ") == ""


def test_shingles_counts_punctuation_and_short_texts():
    assert len(shingles("abcdefg")) == 3                      # abcde bcdef cdefg
    assert len(shingles("aaaaaaaa")) == 1                     # one distinct 5-gram
    assert shingles("Hello, World!") == shingles("hello   world")  # punctuation and case don't matter
    assert len(shingles("abc")) == 1                          # shorter than n: the whole text
    assert shingles("abc") != shingles("abcab")
    assert shingles("abc", n=2) == shingles("ABC!", n=2) and len(shingles("abc", n=2)) == 2
    assert shingles("") == set() and shingles("?!...") == set()
    assert all(0 <= h < 2**64 for h in shingles(FOX))


def test_shingles_are_stable_across_processes():
    code = "from tunesmith.data.dedup import shingles; print(sorted(shingles('Hello stable world')))"
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outputs == {f"{sorted(shingles('Hello stable world'))}\n"}


# ---------------------------------------------------------------- find_duplicates

def test_exact_duplicates_with_case_and_whitespace_variants():
    texts = [FOX, BANK, FOX.upper(), PAPER, "  " + BANK.replace(" ", "\n\t ") + " ", FOX.lower(), RECIPE]
    dups = find_duplicates(texts)
    assert dups.exact_groups == [[0, 2, 5], [1, 4]]
    assert dups.clusters == [[0, 2, 5], [1, 4]]
    assert dups.similarity == {(0, 2): 1.0, (0, 5): 1.0, (1, 4): 1.0}
    assert dups.near_clusters() == []
    assert dups.duplicate_of() == {2: 0, 5: 0, 4: 1}


def test_one_word_edit_is_a_near_duplicate_and_unrelated_texts_are_not():
    edited = edit_words(PAPER, {10: "sparsity"})  # "networks" -> "sparsity"
    sim = jaccard(PAPER, edited)
    assert 0.9 < sim < 1.0
    dups = find_duplicates([FOX, PAPER, BANK, RECIPE, edited, TRAIN])
    assert dups.exact_groups == []
    assert dups.clusters == [[1, 4]]
    assert dups.similarity == {(1, 4): sim}
    assert dups.near_clusters() == [[1, 4]]
    assert dups.duplicate_of() == {4: 1}


def test_threshold_decides_a_pair_near_0_7():
    changed = edit_words(TRAIN, {4: "morning", 7: "mountains", 16: "points", 24: "tea"})  # four words replaced
    sim = jaccard(TRAIN, changed)
    assert 0.7 <= sim <= 0.75, sim
    loose = find_duplicates([TRAIN, BANK, changed], threshold=0.6)
    assert loose.clusters == [[0, 2]] and loose.similarity == {(0, 2): sim}
    strict = find_duplicates([TRAIN, BANK, changed], threshold=0.85)
    assert strict.clusters == [] and strict.similarity == {}


def test_clusters_mix_exact_and_near_and_duplicate_of_points_to_first_member():
    near_fox = edit_words(FOX, {3: "red"})
    texts = [BANK, FOX, RECIPE, near_fox, BANK.upper(), " " + near_fox.lower(), PAPER, FOX + "  "]
    dups = find_duplicates(texts)
    assert dups.exact_groups == [[0, 4], [1, 7], [3, 5]]
    assert dups.clusters == [[0, 4], [1, 3, 5, 7]]
    assert dups.near_clusters() == [[1, 3, 5, 7]]
    assert dups.duplicate_of() == {4: 0, 3: 1, 5: 1, 7: 1}
    sim = jaccard(FOX, near_fox)
    assert dups.similarity == {(0, 4): 1.0, (1, 3): sim, (3, 5): 1.0, (1, 7): 1.0}


def test_similarity_is_best_earlier_member_even_when_linked_through_a_later_one():
    a = RECIPE
    b = edit_words(a, {1: "warm"})
    c = edit_words(b, {30: "sixty"})
    ab, bc, ac = jaccard(a, b), jaccard(b, c), jaccard(a, c)
    threshold = (ac + min(ab, bc)) / 2
    assert ac < threshold < min(ab, bc)
    dups = find_duplicates([a, c, b, FOX], threshold=threshold)  # c (index 1) joins only through b (index 2)
    assert dups.clusters == [[0, 1, 2]]
    best_for_b = (0, 2) if ab >= bc else (1, 2)
    assert dups.similarity == {(0, 1): ac, best_for_b: max(ab, bc)}


def test_matches_brute_force_on_a_random_corpus():
    rng = random.Random(7)
    words = " ".join([FOX, BANK, PAPER, RECIPE, TRAIN]).split()
    base = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(120)]
    texts = list(base)
    for i in rng.sample(range(120), 30):
        texts.append(edit_words(base[i], {rng.randrange(40): rng.choice(words)}))
    texts += [base[i].upper() for i in rng.sample(range(120), 10)]
    dups = find_duplicates(texts, threshold=0.8)
    sets = [shingles(t) for t in texts]
    parent = list(range(len(texts)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= 0.8:
                parent[max(root(i), root(j))] = min(root(i), root(j))
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(root(i), []).append(i)
    expected = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
    assert len(expected) >= 35
    assert dups.clusters == expected


def test_same_input_same_output():
    texts = [FOX, edit_words(FOX, {5: "over"}), BANK, BANK.upper(), PAPER, edit_words(PAPER, {2: "a"})]
    first, second = find_duplicates(texts), find_duplicates(list(texts), progress=True)
    assert first == second
    assert first.clusters == [[0, 1], [2, 3], [4, 5]]


def test_empty_input():
    assert find_duplicates([]) == Duplicates([], [], {})
    assert cross_matches([], [FOX]) == [] and cross_matches([FOX], []) == []


def test_short_texts_and_empty_strings():
    texts = ["ab", "AB", "abc", "abd", "abcd", "abcd!", "", "  ", "!!!", "??", "?? "]
    dups = find_duplicates(texts)
    # "abcd" and "abcd!" differ only in punctuation: same shingle set, Jaccard 1.0, but not exact duplicates.
    # "!!!" and "??" have no shingles, so they only match exact copies ("??" and "?? ").
    assert dups.exact_groups == [[0, 1], [6, 7], [9, 10]]
    assert dups.clusters == [[0, 1], [4, 5], [6, 7], [9, 10]]
    assert dups.near_clusters() == [[4, 5]]
    assert dups.similarity == {(0, 1): 1.0, (4, 5): 1.0, (6, 7): 1.0, (9, 10): 1.0}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates([FOX, BANK], threshold=0)
    with pytest.raises(ValueError, match="num_perm"):
        cross_matches([FOX], [BANK], num_perm=0)


# ---------------------------------------------------------------- cross_matches

def test_cross_matches_exact_and_near_pairs():
    near_paper = edit_words(PAPER, {10: "sparsity"})
    train = [FOX, PAPER, BANK, RECIPE, "  " + FOX.upper(), TRAIN]
    evaluation = [near_paper, "unrelated short question?", FOX.lower(), "Quick brown fox!", RECIPE + "!!"]
    sim = jaccard(PAPER, near_paper)
    assert cross_matches(train, evaluation) == [
        CrossMatch(0, 2, 1.0, True),
        CrossMatch(1, 0, sim, False),
        CrossMatch(3, 4, 1.0, False),   # differs only in punctuation
        CrossMatch(4, 2, 1.0, True),
    ]


def test_cross_matches_ignore_pairs_inside_one_side_and_respect_threshold():
    changed = edit_words(BANK, {0: "Kindly", 5: "whole", 9: "old", 14: "former", 22: "text", 28: "code", 33: "has"})
    sim = jaccard(BANK, changed)
    assert 0.6 < sim < 0.85, sim
    train = [BANK, BANK.upper()]   # duplicates within train are not cross matches
    assert cross_matches(train, [changed]) == []
    assert cross_matches(train, [changed], threshold=0.6) == [CrossMatch(0, 0, sim, False),
                                                               CrossMatch(1, 0, sim, False)]
