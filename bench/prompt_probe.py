"""Does a prompt around the text help a decoder's last token? A frozen-feature probe, with and without it.

Embeds the first N training rows and every validation row with the frozen default model (last real token's
state), fits the `features` method's logistic regression, and prints validation accuracy for the raw text and for
the text inside a short prompt. No training; minutes on a CPU.

    .venv/bin/python bench/prompt_probe.py [--dataset sst2] [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tunesmith.methods.features import FeaturesParams, embed, evaluate, fit_classifier, load_encoder
from tunesmith.model import load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {"sst2": "Review: {text}\nSentiment:", "banking77": "Question: {text}\nIntent:"}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sst2", choices=sorted(PROMPTS))
    parser.add_argument("--rows", type=int, default=2000, help="training rows the probe is fitted on")
    parser.add_argument("--C", type=float, default=1.0)
    args = parser.parse_args()
    folder = ROOT.parent / "shared" / "datasets" / args.dataset
    train, val = read(folder / "train.jsonl")[:args.rows], read(folder / "validation.jsonl")
    labels = sorted({r["label"] for r in train})
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[r["label"]] for r in train])
    y_val = np.array([index.get(r["label"], -1) for r in val])
    source = resolve_model("default")
    tokenizer, encoder = load_tokenizer(source), load_encoder(source)
    print(f"| {args.dataset} text | probe rows | validation rows | accuracy | seconds |")
    print("|---|---|---|---|---|")
    for name, template in (("raw", "{text}"), ("in a prompt", PROMPTS[args.dataset])):
        t0 = time.time()
        ids = [[tokenizer(template.replace("{text}", r["text"]), truncation=True, max_length=96)["input_ids"]
                for r in rows] for rows in (train, val)]
        x, x_val = (embed(encoder, part, tokenizer.pad_token_id, "last", 32) for part in ids)
        clf = fit_classifier(x, y, FeaturesParams(C=args.C), 0)
        accuracy = evaluate(clf, x_val, y_val)["accuracy"]
        print(f"| {name} | {len(train)} | {len(val)} | {100 * accuracy:.1f}% | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
