"""The tunesmith demo: teach the bundled SmolLM2-135M-Instruct to turn meeting requests into calendar JSON.

Run with `make demo` (or `python examples/meeting-json/demo.py [KEY=VALUE ...]`). It fine-tunes with LoRA on
320 rows, prints the validation loss before and after, then asks the base and the tuned model the same
held-out requests and counts how many answers are exactly the expected JSON.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).parent


def main(overrides: list[str]) -> int:
    from tunesmith.model import quiet_libraries as _quiet_libraries
    from tunesmith.errors import TunesmithError
    from tunesmith.recipe import load_recipe

    try:
        recipe = load_recipe(HERE / "recipe.yaml", ["output.overwrite=true", *overrides])
    except TunesmithError as exc:
        print(exc, file=sys.stderr)
        return 2
    _quiet_libraries()
    from tunesmith.data.format import prompt_messages
    from tunesmith.data.records import load_records
    from tunesmith.generate import generate, load_run
    from tunesmith.train import train_run

    manifest = train_run(recipe)
    heldout = load_records(HERE / "heldout.jsonl").records
    conversations = [prompt_messages(r) for r in heldout]
    expected = [r.data["output"] for r in heldout]
    answers = {}
    for name, base in (("base", True), ("tuned", False)):
        loaded = load_run(recipe.output.dir, base=base)
        answers[name] = generate(loaded, conversations, max_new_tokens=96)

    print("\nheld-out requests (never seen in training): base vs tuned")
    for i, record in enumerate(heldout[:4]):
        print(f"\n[{i + 1}] {record.data['input']}")
        for name in ("base", "tuned"):
            print(textwrap.indent(textwrap.shorten(answers[name][i], 300), f"  {name:>5}: ", lambda _: True))
    print("\nresult")
    losses = manifest["losses"]
    print(f"  validation loss  {losses['validation_before']:.3f} -> {losses['validation_after']:.3f}")
    for name in ("base", "tuned"):
        exact = sum(a.strip() == e for a, e in zip(answers[name], expected))
        valid = sum(_is_json(a) for a in answers[name])
        print(f"  {name:>5}: {exact}/{len(expected)} exactly right, {valid}/{len(expected)} valid JSON")
    print(f"\nrun folder: {recipe.output.dir}\ntry: tunesmith generate {recipe.output.dir} "
          f"\"Turn this meeting request into a calendar event JSON.\n\nLunch with Ana on Friday at noon, 1 hour.\"")
    return 0


def _is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
