"""Evaluation throughput: tunesmith's batched scoring/generation against a plain one-prompt-at-a-time loop.

Two workloads on the default model (SmolLM2-135M-Instruct), both engines in this one process, same prompts:
- SST-2 classification: tunesmith scores the two allowed labels (label scoring, batched, bf16 where the CPU has
  AMX); the plain loop generates a short answer for each prompt with `model.generate` (fp32, batch 1) and parses it.
- SciTLDR summaries: tunesmith generates in length-sorted batches with left padding and the KV cache; the plain
  loop calls `model.generate` once per document (fp32).
- BANKING77 (77 intents): label scoring with the prompt's key/value cache shared by all 77 labels, against scoring
  each (prompt, label) sequence separately in batches (the two-label path); both bf16, same predictions expected.
The plain loop is slow, so it runs on the first `--plain-rows` prompts; tunesmith runs on those and on all rows.
A workload given 0 rows is skipped.

    .venv/bin/python bench/eval_throughput.py [--sst2 1000] [--scitldr 300] [--banking77 200] [--plain-rows 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SUMMARY_PROMPT = "Summarize this abstract in one sentence.\n\n"
INTENT_PROMPT = "Which banking intent does this customer message express? Answer with the intent's name.\n\n"
LABEL_PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"


def rows(name: str, files: tuple[str, ...], n: int) -> list[dict]:
    out = []
    for f in files:
        with open(SHARED / name / f, encoding="utf-8") as fh:
            out.extend(json.loads(line) for line in fh)
    if len(out) < n:
        raise SystemExit(f"{name} has {len(out)} rows, {n} asked for")
    return out[:n]


def loaded_default(dtype):
    from transformers import AutoTokenizer, GenerationConfig

    from tunesmith.generate import Loaded
    from tunesmith.model import default_model_dir, load_model, resolve_model

    model = load_model(resolve_model("default"), dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tok.padding_side = "left"
    config = GenerationConfig.from_pretrained(default_model_dir())
    config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    config.pad_token_id = tok.pad_token_id
    return Loaded(model, tok, config, "default")


def plain_loop(loaded, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The tutorial way: one prompt at a time, model.generate, decode."""
    import torch

    tok, answers = loaded.tokenizer, []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        batch = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                        generation_config=loaded.generation_config)
        answers.append(tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sst2", type=int, default=1000)
    ap.add_argument("--scitldr", type=int, default=300)
    ap.add_argument("--banking77", type=int, default=200)
    ap.add_argument("--plain-rows", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    from tunesmith.evaluation.scoring import generate_sorted, score_labels
    from tunesmith.model import pick_precision

    fast = loaded_default(torch.bfloat16 if pick_precision("auto") == "bf16" else None)
    plain = loaded_default(None)
    sst = rows("sst2", ("validation.jsonl", "train.jsonl"), args.sst2) if args.sst2 else []
    sci = rows("scitldr", ("validation.jsonl",), args.scitldr) if args.scitldr else []
    table = []

    k = args.plain_rows
    if args.banking77:
        bank = rows("banking77", ("validation.jsonl",), args.banking77)
        intents = sorted({r["label"] for r in rows("banking77", ("train.jsonl",), 5000)})
        prompts = [[{"role": "user", "content": INTENT_PROMPT + r["text"]}] for r in bank]
        shared, t_shared = timed(lambda: score_labels(fast, prompts, intents, args.batch_size, shared_prefix=True))
        sub = prompts[:k]
        separate, t_separate = timed(lambda: score_labels(fast, sub, intents, args.batch_size, shared_prefix=False))
        _, t_shared_sub = timed(lambda: score_labels(fast, sub, intents, args.batch_size, shared_prefix=True))
        same = sum(max(a, key=a.get) == max(b, key=b.get) for a, b in zip(shared, separate))
        gap = max(abs(a[x] - b[x]) for a, b in zip(shared, separate) for x in intents)
        acc = sum(max(s, key=s.get) == r["label"] for s, r in zip(shared, bank)) / len(bank)
        table.append((f"banking77, {len(intents)} labels (shared prompt cache vs separate sequences)", len(bank),
                      t_shared, k, t_shared_sub, t_separate, f"{acc:.3f} zero-shot ({len(bank)} rows)",
                      f"same prediction {same}/{k}; max log-prob gap {gap:.3f}"))

    if sst:  # SST-2: label scoring vs a generate-and-parse loop
        prompts = [[{"role": "user", "content": LABEL_PROMPT + r["text"]}] for r in sst]
        scores, t_fast_all = timed(lambda: score_labels(fast, prompts, ["negative", "positive"], args.batch_size))
        _, t_fast_sub = timed(lambda: score_labels(fast, prompts[:k], ["negative", "positive"], args.batch_size))
        answers, t_plain = timed(lambda: plain_loop(plain, [LABEL_PROMPT + r["text"] for r in sst[:k]], 4))
        acc_fast = sum(max(s, key=s.get) == r["label"] for s, r in zip(scores, sst)) / len(sst)
        parsed = ["positive" if "pos" in a.lower() else "negative" if "neg" in a.lower() else "?" for a in answers]
        acc_plain = sum(p == r["label"] for p, r in zip(parsed, sst[:k])) / k
        table.append(("sst2 (label scoring vs generate+parse)", len(sst), t_fast_all, k, t_fast_sub, t_plain,
                      f"{acc_fast:.3f} ({len(sst)} rows) / {sum(max(s, key=s.get) == r['label'] for s, r in zip(scores[:k], sst[:k])) / k:.3f} ({k})",
                      f"{acc_plain:.3f} ({k}); {parsed.count('?')} unparseable"))

    if sci:  # SciTLDR: batched generation vs one at a time
        convs = [[{"role": "user", "content": SUMMARY_PROMPT + r["document"]}] for r in sci]
        _, t_fast_all = timed(lambda: generate_sorted(fast, convs, args.max_new_tokens, args.batch_size))
        _, t_fast_sub = timed(lambda: generate_sorted(fast, convs[:k], args.max_new_tokens, args.batch_size))
        _, t_plain = timed(lambda: plain_loop(plain, [SUMMARY_PROMPT + r["document"] for r in sci[:k]],
                                              args.max_new_tokens))
        table.append(("scitldr (batched generation vs loop)", len(sci), t_fast_all, k, t_fast_sub, t_plain, "", ""))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"load {os.getloadavg()[0]:.2f}; max_new_tokens {args.max_new_tokens}, batch {args.batch_size}")
    print("| workload | rows | tunesmith all rows (s) | subset rows | tunesmith subset (s) | plain loop subset (s) | "
          "speed-up on the subset | accuracy tunesmith | accuracy plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, t_all, k, t_sub, t_pl, a1, a2 in table:
        print(f"| {name} | {n} | {t_all:.1f} | {k} | {t_sub:.1f} | {t_pl:.1f} | {t_pl / t_sub:.1f}× | {a1} | {a2} |")


if __name__ == "__main__":
    main()
