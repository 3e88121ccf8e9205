"""How a plan reads on the terminal: the table `tunesmith plan` prints, the probe's lines under it, and the one line
`tunesmith train` prints before the model loads."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunesmith.plan import Plan

GB = 1024**3


def gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def format_plan(plan: Plan) -> str:
    """The plan as the terminal table `tunesmith plan` prints."""
    from tunesmith.plan import TIGHT

    s, m = plan.settings, plan.model
    where = f"{plan.device} · {plan.device_name} · {gb(plan.capacity)}"
    strategy = s.strategy + (f" zero {s.zero_stage}" if s.strategy == "deepspeed" else "") + \
        (f" offload {s.offload}" if s.offload != "none" else "")
    rows = [("model", m.name), ("method", f"{plan.method} ({s.adapter}) · precision {s.precision}"),
            ("parameters", f"{plan.total:,} total · {plan.trainable:,} trainable "
                           f"({100 * plan.trainable / max(plan.total, 1):.2f}%)"),
            ("device", where), ("strategy", f"{strategy} · world size {s.world_size}"),
            ("batch", f"{s.batch_size} per device × {s.accumulation} accumulation × {s.world_size} = "
                      f"{plan.global_batch} rows per step; longest sequence {plan.longest} tokens "
                      f"(max_seq_len {s.max_seq_len})"),
            ("steps", f"{plan.steps:,} optimizer steps from {plan.rows:,} training rows")]
    width = max(len(k) for k, _ in rows)
    lines = ["", "plan"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += ["", f"  memory per device{'':<8}{'GB':>8}  what"]
    for t in plan.terms:
        lines.append(f"  {t.name:<25}{t.bytes / GB:>8.2f}  {t.note}")
    lines.append(f"  {'peak (step)':<25}{plan.peak / GB:>8.2f}  resident terms + the larger of (activations, logits, "
                 "retention) and gradients, or the KV cache")
    lines.append(f"  {'runtime':<25}{plan.runtime / GB:>8.2f}  libraries" +
                 (" and CUDA context" if plan.device == "cuda" else ", tokenizer and rows (measured here)"))
    lines.append(f"  {'total':<25}{(plan.peak + plan.runtime) / GB:>8.2f}  of {gb(plan.capacity)} "
                 f"({plan.share:.0%})")
    lines += ["", f"  verdict: {plan.verdict.upper()}" + {"fits": "", "tight": f" (over {TIGHT:.0%} of the memory)",
                                                          "will not fit": ""}[plan.verdict]]
    if plan.fixes:
        lines.append("  fixes, cheapest first:")
        for f in plan.fixes:
            lines.append(f"    {f.what:<60} peak {gb(f.peak)} · {f.verdict} — {f.why}")
    if plan.probe is not None:
        lines += probe_lines(plan)
    return "\n".join(lines)


def summary_line(plan: Plan) -> str:
    """One line: the estimate and the verdict (what `tunesmith train` prints before the model loads)."""
    return (f"plan: peak {gb(plan.peak)} + runtime {gb(plan.runtime)} of {gb(plan.capacity)} on {plan.device} "
            f"({plan.share:.0%}): {plan.verdict}; {plan.steps:,} steps (`tunesmith plan` for the table)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def probe_lines(plan) -> list[str]:
    """The probe's lines under the plan's table."""
    p = plan.probe
    lines = ["", f"  probe (measured: {len(p.step_seconds)} steps on the longest batch, 1 evaluation batch)",
             f"    peak memory      {gb(p.peak_bytes)} — {p.measured}; the plan said {gb(plan.peak)} "
             f"({(plan.peak - p.peak_bytes) / max(p.peak_bytes, 1):+.0%})",
             f"    steps            {', '.join(f'{s:.2f} s' for s in p.step_seconds)} → {p.seconds_per_step:.2f} s "
             f"per optimizer step on the longest batch (the fastest after the first)"]
    if p.eval_seconds_per_batch is not None:
        lines.append(f"    evaluation       {p.eval_seconds_per_batch:.2f} s per batch")
    low = f" (~{_duration(p.finish_low_seconds)} if steps shrink with a typical batch's tokens, × " \
        f"{p.typical_scale:.2f})" if p.typical_scale < 0.95 else ""
    lines.append(f"    time to finish   ~{_duration(p.finish_seconds)}{low}: {plan.steps:,} steps × "
                 f"{p.seconds_per_step:.2f} s + "
                 f"{p.evaluations} evaluation batches")
    return lines
