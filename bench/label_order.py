"""Label scoring with a shared prompt cache: label continuations in file order (before) vs by length (after).

Few-shot prompts for BANKING77 (8 training questions with their intents, then the validation question); the 77
intent names are scored as answers by `_shared_prefix_logprobs` of commit e6c6bff (continuations in label order,
16 to a chunk) and of the working tree (in order of length), alternating row by row in one process so that load
on the machine hits both alike. Prints seconds per row, the ratio and whether the scores agree.

    OMP_NUM_THREADS=1 .venv/bin/python bench/label_order.py [--rows 10] [--before e6c6bff]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from eval_throughput import INTENT_PROMPT, SHARED, loaded_default  # noqa: E402


def module_at(revision: str, path: str):
    """The module `path` as it was at `revision` (git show), imported under a name of its own."""
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / "scoring_before.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("scoring_before", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import torch

    from tunesmith.data.format import encode_chat, last_answer_only
    from tunesmith.evaluation import scoring as after

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--before", default="e6c6bff")
    args = ap.parse_args()
    before = module_at(args.before, "src/tunesmith/evaluation/scoring.py")
    loaded = loaded_default(torch.float32)
    tok = loaded.tokenizer
    labels = json.loads((SHARED / "banking77" / "labels.json").read_text())
    read = lambda f: [json.loads(line) for line in (SHARED / "banking77" / f).read_text().splitlines()]  # noqa: E731
    shots = []
    for r in read("train.jsonl")[:8]:
        shots += [{"role": "user", "content": INTENT_PROMPT + r["text"]}, {"role": "assistant", "content": r["label"]}]
    seconds, agree, width = {"before": 0.0, "after": 0.0}, 0, 0
    rows = read("validation.jsonl")[:args.rows]
    for r in rows:
        prompt = shots + [{"role": "user", "content": INTENT_PROMPT + r["text"]}]
        seqs = [last_answer_only(*encode_chat(tok, prompt + [{"role": "assistant", "content": label}]))
                for label in labels]
        width = len(seqs[0][0])
        got = {}
        for name, module in (("before", before), ("after", after)):
            t0 = time.perf_counter()
            got[name] = module._shared_prefix_logprobs(loaded.model, seqs, tok.pad_token_id, 16)
            seconds[name] += time.perf_counter() - t0
        agree += max(abs(a[0] - b[0]) for a, b in zip(got["before"], got["after"])) < 1e-3
    print("| rows | prompt tokens | before (s/row) | after (s/row) | speed-up | scores agree (1e-3) |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(rows)} | {width} | {seconds['before'] / len(rows):.2f} | {seconds['after'] / len(rows):.2f} | "
          f"{seconds['before'] / seconds['after']:.2f}× | {agree}/{len(rows)} |")


if __name__ == "__main__":
    main()
