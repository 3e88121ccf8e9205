"""`tunesmith data preview`: the data exactly as training will see it, before any training starts."""

from __future__ import annotations

from tunesmith.data import prepare_data
from tunesmith.data.format import encode, preview_marked, stats
from tunesmith.methods import REGISTRY
from tunesmith.model import load_tokenizer, resolve_model
from tunesmith.recipe import Recipe


def preview(recipe: Recipe, rows: int = 3) -> str:
    """Formatted examples with trained tokens marked ⟦…⟧, token counts, truncation and reject counts."""
    method = REGISTRY[recipe.method.name]
    data = prepare_data(recipe.data, recipe.train.seed, method.record_types)
    tokenizer = load_tokenizer(resolve_model(recipe.model.name, recipe.model.cache_dir))
    train_on = getattr(recipe.method, "train_on", "responses")
    max_len = recipe.train.max_seq_len
    encoded = [encode(r, tokenizer, max_len, train_on, recipe.data.system_prompt) for r in data.train]
    out = []
    for record, enc in list(zip(data.train, encoded))[:rows]:
        cut = f", truncated from {enc.full_length}" if enc.truncated else ""
        out.append(f"── {record.source}:{record.line} · {len(enc.input_ids)} tokens{cut}, "
                   f"{enc.trained_tokens} trained ──")
        out.append(preview_marked(tokenizer, enc))
    s = stats(encoded)
    counts = data.counts()
    out.append("── summary ──")
    for path, c in counts["files"].items():
        reasons = ", ".join(f"{k} ×{v}" for k, v in c["reasons"].items())
        out.append(f"{path}: {c['read']} read, {c['used']} used, {c['rejected']} rejected"
                   + (f" ({reasons})" if reasons else ""))
    out.append(f"record type: {data.kind} · train rows: {s['rows']} · validation rows: {len(data.validation)}")
    out.append(f"tokens: {s['tokens']} total, {s['trained_tokens']} trained "
               f"({s['trained_tokens'] / max(s['tokens'], 1):.0%}) · length min {s['length_min']} / "
               f"median {s['length_median']} / max {s['length_max']}")
    empty = sum(1 for e in encoded if e.trained_tokens == 0)
    out.append(f"max_seq_len {max_len}: {s['truncated_rows']} rows would be truncated"
               + (f", {empty} of them left with nothing to train on (they would be rejected)" if empty else ""))
    out.append("⟦…⟧ marks the tokens the loss is computed on")
    return "\n".join(out)
