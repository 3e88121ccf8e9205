"""`tunesmith plan`: will this recipe fit, and how long will it take — answered before anything heavy loads.

The analytic plan reads the model's config (no weights: the parameter counts come from the model built on torch's
`meta` device with the recipe's real adapter applied) and the encoded rows, and adds up, per device:

    weights (4-bit for qlora) · gradients and AdamW states of the trainable parameters · activations of the longest
    batch · logits over the vocabulary · reference / reward models · the KV cache of generation

split by `distributed` (ddp: a full copy each; deepspeed ZeRO-2: gradients and optimizer states / world size; ZeRO-3
and fsdp: the weights too; offload: to CPU memory). The verdict compares the peak with the device's memory, and a
plan that will not fit lists fixes, cheapest first, each re-estimated. `tunesmith plan --probe` measures instead
(plan_probe.py). The constants below were measured on this project's CPU (see BENCHMARKS.md, "Plan accuracy").
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from tunesmith.errors import RunError, TunesmithError
from tunesmith.plan_inputs import (Batch, ModelFacts, Shape, shape_of, count_steps, encoded_rows,  # noqa: F401
                                   longest_batch, model_facts, row_sequences)
from tunesmith.recipe import Recipe

GB = 1024**3
TIGHT = 0.85  # above this share of the device's memory the verdict is "tight"
GPU_DEFAULT_BYTES = 80 * 10**9  # `--device cuda` with no GPU here: an 80 GB card (H100 / A100 80GB)
# What the process holds before the model loads (python, torch, transformers, trl, tokenizer, rows): measured RSS
# after `tunesmith train`'s imports and data preparation on this CPU, 2026-12-07 (0.71-0.78 GB). CUDA: the context.
RUNTIME_BYTES = {"cpu": int(0.75 * GB), "cuda": int(0.5 * GB)}

# Activations autograd saves per token per decoder layer, as (c × hidden + 4 × intermediate) fp32 values: counted
# with torch.autograd.graph.saved_tensors_hooks on SmolLM2 (30 layers, hidden 576, intermediate 1536; sdpa,
# torch 2.13 CPU), parameters excluded, storages counted once. 4 × intermediate is the MLP (gate, up, silu(gate),
# their product); c × hidden the norms, q/k/v after RoPE, attention output and what the adapter adds. A token of
# a LoRA layer with dropout saves its dropped copy of every adapted input: 13.05 against 6.88 without dropout.
ACTIVATION_C = {"full": 8.69, "freeze": 8.69, "lora": 6.88, "lora_dropout": 13.05, "dora": 47.5, "ia3": 5.38,
                "adapter": 4.52, "prefix": 4.18, "prompt": 4.18}
EDGE_VALUES = 3  # × hidden per token outside the layers (embedding output, final norm), same count
# The loss's share where logits are whole (ppo's generated replies): the logits (fp32) and cross-entropy's
# log-softmax, and the backward adds the gradient of both: LOGIT_COPIES fp32 copies at its peak. sft and pretrain
# (trained_token_loss) never hold them whole: methods/head_loss.py projects a chunk of labelled positions at a time
# and forms its gradient in place — one chunk's fp32 logits (under bf16 also the matmul's bf16 output and the
# gradient's bf16 copy, and the head's weight cast once), plus the gradient of the hidden states (see
# chunked_head_term).
LOGIT_COPIES = 3
# TRL's fused LM head (dpo, kto, orpo, grpo, rloo: `add_fused_lm_head`, trl/kernels/chunked_logprob.py) never builds
# the logits: it projects tiles of FUSED_TOKEN_TILE positions × FUSED_VOCAB_TILE vocabulary entries, one at a time,
# and keeps only per-position sums. On a device without Triton (the CPU) it scores every position of every sequence
# (batch × (length - 1), the reference's forward too); with Triton (CUDA) only the labelled ones. Its peak is the
# backward of one tile, which recomputes the tile and turns it into the logits' gradient in torch ops: measured with
# torch.profiler on dpo lora b2 s256 (bench/plan_accuracy.py, 2026-12-08), 8 fp32 [996 × 32768] tensors of 124.5 MB
# and one bool alive at once inside ChunkedLogProbFunctionBackward — the reused tile buffer (compute dtype), its fp32
# copy × logit scale, × 1/temperature, log p, p, the zero-filled gradient, the target one-hot as float, one-hot − p
# (and the one-hot as bool) — 1.03 GB at the step's peak, with every activation still alive. The Triton kernels work
# in place: the tile buffer alone. FUSED_LOGIT_COPIES was 2 copies of the whole batch × length × vocabulary before.
FUSED_TOKEN_TILE, FUSED_VOCAB_TILE = 4096, 32768  # TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16
FUSED_TILE_FP32_COPIES = 7  # beside the buffer, in the backward's torch ops (CPU)
# On the CPU, glibc's malloc keeps freed activation memory in its heap between steps (tensors under its mmap
# threshold, which grows to 32 MB after large frees: the many small activation tensors, not the logits, which are
# mapped and unmapped whole), so a step's resident peak exceeds the bytes alive at once. Fitted by least squares on
# five recipes of bench/plan_accuracy.py (sft lora b4/b8 × s128/s256, full, qlora; 2026-12-08, AMD EPYC, fp32):
# resident peak = the terms + 0.98 × activations + 0.06 GB (trainer, datasets, optimizer). The retention follows
# the forward's working set, so it is the activations *without* checkpointing (the one checkpointed recipe
# measured 1.56 and 1.91 GB in two runs against 1.65 predicted; 1.10 if counted on its checkpointed activations).
# MALLOC_MMAP_THRESHOLD_=131072 brings it to 0 (1.08 GB measured vs 1.07 predicted for sft lora b4 s128) at
# 1.7-10x slower steps. GPUs: max_memory_allocated counts tensors, so 0 there.
CPU_RETAINED = 0.98
CPU_OVERHEAD = int(0.06 * GB)
MIXED_ACTIVATION_SHARE = 0.6  # bf16/fp16 autocast: matmul outputs are half width, norms stay fp32 (not measured here)


@dataclass(frozen=True)
class Settings:
    """The recipe's knobs that move the estimate (a fix changes some and is estimated again)."""

    adapter: str
    batch_size: int
    accumulation: int
    max_seq_len: int
    checkpointing: bool
    precision: str
    strategy: str
    world_size: int
    zero_stage: int
    offload: str
    dropout: bool  # LoRA dropout above 0 (its dropped copies are saved)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    note: str = ""
    host: bool = False  # offloaded to CPU memory: not on the device


@dataclass
class Fix:
    what: str  # in recipe wording, e.g. "train.batch_size=4 train.gradient_accumulation=2"
    why: str
    peak: int
    verdict: str


@dataclass
class Plan:
    """The analytic plan of one recipe on one device (per device under its distributed strategy)."""

    method: str
    model: ModelFacts
    settings: Settings
    device: str  # cpu | cuda
    device_name: str
    capacity: int  # bytes of memory on one device
    terms: list[Term]
    peak: int  # bytes on one device at the step's peak (not the sum: see `peak_of`)
    runtime: int  # libraries / CUDA context, counted in the verdict
    other_activations: int  # the activations with gradient checkpointing the other way
    longest: int  # tokens in the longest sequence
    sequences: int  # sequences in one device's micro-batch
    rows: int
    steps: int
    global_batch: int
    verdict: str
    fixes: list[Fix] = field(default_factory=list)
    probe: Any = None  # plan_probe.ProbeResult once measured

    @property
    def trainable(self) -> int:
        return self.model.trainable.get(self.settings.adapter, 0)

    @property
    def total(self) -> int:
        """Parameters of the model as trained: the base and what the adapter adds."""
        return self.model.total + self.model.added.get(self.settings.adapter, 0)

    @property
    def share(self) -> float:
        return (self.peak + self.runtime) / self.capacity

    def biggest(self) -> Term:
        return max((t for t in self.terms if not t.host), key=lambda t: t.bytes)


# ----------------------------------------------------------------------------------------------- the estimate


def settings_of(recipe: Recipe) -> Settings:
    from tunesmith.methods.adapters import adapter_settings

    d, p = recipe.distributed, recipe.method
    adapter = getattr(p, "adapter", "full")
    s = adapter_settings(p) if hasattr(p, "adapter") else None
    dropout = bool(getattr(s, "dropout", 0)) and not getattr(p, "disable_dropout", False)
    return Settings(adapter=adapter, batch_size=recipe.train.batch_size,
                    accumulation=recipe.train.gradient_accumulation, max_seq_len=recipe.train.max_seq_len,
                    checkpointing=recipe.train.gradient_checkpointing, precision=recipe.train.precision,
                    strategy=d.effective(), world_size=d.world_size, zero_stage=d.zero_stage, offload=d.offload,
                    dropout=dropout)


def activation_bytes(m: ModelFacts, s: Settings, tokens: int, checkpointing: bool) -> int:
    """What autograd keeps for the backward of `tokens` tokens (see ACTIVATION_C)."""
    key = "lora_dropout" if s.adapter in ("lora", "qlora") and s.dropout else \
        "lora" if s.adapter == "qlora" else s.adapter
    c = ACTIVATION_C.get(key, ACTIVATION_C["full"])
    per_layer = 4 * (c * m.hidden + 4 * m.intermediate)
    if s.precision in ("bf16", "fp16"):
        per_layer *= MIXED_ACTIVATION_SHARE
    edge = 4 * EDGE_VALUES * m.hidden
    if checkpointing:  # each layer's input, and one layer recomputed at a time in the backward
        return int(tokens * (m.layers * 4 * m.hidden + per_layer + edge))
    return int(tokens * (m.layers * per_layer + edge))


def estimate(m: ModelFacts, s: Settings, shape: Shape, rows: list, params, device: str) -> tuple[list[Term], int,
                                                                                                   int, Batch]:
    """(terms per device, peak bytes per device, activations with checkpointing the other way, the batch)."""
    completion = getattr(params, "max_completion_length", 0) if shape.generates else 0
    batch = longest_batch(rows, s.batch_size, s.max_seq_len, shape.sequences, completion)
    tokens = batch.sequences * batch.longest
    trainable, added = m.trainable.get(s.adapter, 0), m.added.get(s.adapter, 0)
    mixed = s.precision in ("bf16", "fp16")
    if s.adapter == "qlora":
        quant = getattr(getattr(params, "qlora", None), "double_quant", True)
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if quant else 4 / 64)  # NF4 + its block constants
        weights = int(m.linear * per_weight + (m.total - m.linear + added) * 4)
        w_note = (f"{m.linear:,} linear weights in 4 bits (NF4, block constants), {m.total - m.linear + added:,} "
                  "in fp32")
    else:
        weights = (m.total + added) * 4
        w_note = f"{m.total + added:,} parameters in fp32 (tunesmith loads fp32" + \
            (f"; {s.precision} is autocast)" if mixed else ")")
    terms = [Term("weights", weights, w_note)]
    if mixed:
        terms.append(Term("autocast weight copies", m.linear * 2, "bf16 casts of linear weights kept for the backward"))
    if shape.trains:
        terms += [Term("gradients", trainable * 4, f"{trainable:,} trainable parameters, fp32"),
                  Term("AdamW states", trainable * 8, "two fp32 moments per trainable parameter (the fp32 weights "
                                                      "are their own master copy)")]
        if s.strategy == "ddp":
            terms.append(Term("DDP gradient buckets", trainable * 4, "a flat copy of the gradients for all-reduce"))
    act = activation_bytes(m, s, tokens, s.checkpointing) if shape.trains else 0
    other = activation_bytes(m, s, tokens, not s.checkpointing) if shape.trains else 0
    gc = "with" if s.checkpointing else "without"
    terms.append(Term("activations", act, f"{batch.sequences} × {batch.longest} tokens, {gc} gradient checkpointing "
                                          f"({'with' if not s.checkpointing else 'without'}: {other / GB:.2f} GB)"))
    terms.append(_logits_term(m, shape, batch, params, device, mixed))
    if shape.reference and _has_reference(params):
        copy = s.adapter in ("full", "freeze", "adapter") or bool(getattr(params, "policy", None))
        ref = m.total * 4 if s.adapter in ("full", "freeze", "adapter") else (trainable * 4 if copy else 0)
        terms.append(Term("reference model", ref, "a frozen copy of the starting weights" if ref > trainable * 4 else
                          "the base with the adapter switched off (no copy)" if not copy else "a frozen adapter copy"))
    if m.reward_params:
        terms.append(Term("reward model", m.reward_params * 4, "the reward run's model, fp32"))
    if device == "cpu" and shape.trains:
        working = other if s.checkpointing else act
        terms.append(Term("allocator retention", int(CPU_RETAINED * working) + CPU_OVERHEAD,
                          f"freed memory malloc keeps between steps: {CPU_RETAINED} × activations without "
                          f"checkpointing + {CPU_OVERHEAD / GB:.2f} GB (fitted on this CPU)"))
    kv = 0
    if shape.generates:
        gen_rows = s.batch_size
        kv = gen_rows * batch.longest * m.layers * 2 * m.kv_width * (2 if mixed else 4)
        terms.append(Term("KV cache (generation)", kv, f"{gen_rows} replies × {batch.longest} tokens, no gradient"))
    terms = _split(terms, m, s)
    return terms, peak_of(terms), other, batch


def _has_reference(params) -> bool:
    for key in ("beta", "kl_coef"):
        if hasattr(params, key):
            return getattr(params, key) > 0 or key == "kl_coef"  # ppo scores the reference for its KL always
    return True


def chunked_head_term(m: ModelFacts, batch: Batch, mixed: bool = False) -> Term:
    """methods/head_loss.py's chunked head and loss at its peak: one chunk of logits and the hidden-state gradient."""
    from tunesmith.methods.head_loss import CHUNK_ELEMENTS

    n = batch.sequences * batch.loss_positions
    rows = min(n, max(1, CHUNK_ELEMENTS // m.vocab))
    per_logit = 4 + (4 if mixed else 0)  # fp32 logits/gradient; under bf16 the matmul's output and a bf16 copy
    size = rows * m.vocab * per_logit + n * m.hidden * 4 + (m.vocab * m.hidden * 2 if mixed else 0)
    return Term("logits", size, f"one {rows:,} × {m.vocab:,} chunk of the head at {n:,} labelled positions "
                                f"(methods/head_loss.py), and their hidden states' gradient")


def _logits_term(m: ModelFacts, shape: Shape, batch: Batch, params, device: str = "cpu",
                 mixed: bool = False) -> Term:
    if shape.loss == "head" or not shape.trains:
        return Term("logits", batch.sequences * 8 * 4, "a small head instead of the vocabulary")
    if shape.loss == "trained":
        return chunked_head_term(m, batch, mixed)
    if shape.loss == "generated":
        width = getattr(params, "max_completion_length", 1) + 1
        n = batch.sequences * width
        return Term("logits", n * m.vocab * 4 * LOGIT_COPIES, f"{n:,} reply positions × {m.vocab:,}, fp32 log-softmax")
    return fused_head_term(m, batch, device, mixed)


def fused_head_term(m: ModelFacts, batch: Batch, device: str, mixed: bool) -> Term:
    """The peak of TRL's fused LM head: the backward of one tile (see FUSED_TOKEN_TILE)."""
    triton = device == "cuda"
    n = batch.sequences * (batch.loss_positions if triton else max(1, batch.longest - 1))
    rows, cols = min(n, FUSED_TOKEN_TILE), min(m.vocab, FUSED_VOCAB_TILE)
    buffer = rows * cols * (2 if mixed else 4)
    if triton:
        return Term("logits", buffer, f"one {rows:,} × {cols:,} tile of TRL's fused head (of {n:,} labelled positions "
                                      f"× {m.vocab:,})")
    work = rows * cols * (4 * FUSED_TILE_FP32_COPIES + 1)
    return Term("logits", buffer + work, f"TRL's fused head, backward of one {rows:,} × {cols:,} tile of {n:,} "
                                         f"positions × {m.vocab:,}: the buffer, {FUSED_TILE_FP32_COPIES} fp32 copies "
                                         "and a bool mask (torch ops on CPU)")


def _split(terms: list[Term], m: ModelFacts, s: Settings) -> list[Term]:
    """Each term's share on one device under the strategy; offloaded ones marked `host`."""
    world, out = max(1, s.world_size), []
    sharded = {"deepspeed": {"gradients", "AdamW states"}, "fsdp": {"gradients", "AdamW states", "weights"}}
    shards = set(sharded.get(s.strategy, set()))
    if s.strategy == "deepspeed" and s.zero_stage == 3:
        shards.add("weights")
    for t in terms:
        b, note = t.bytes, t.note
        if t.name in shards and world > 1:
            b, note = b // world, f"{note}; 1/{world} per device"
        host = (t.name == "AdamW states" and s.offload in ("optimizer", "parameters")) or \
            (t.name == "weights" and s.offload == "parameters" and "weights" in shards)
        out.append(Term(t.name, b, note + ("; offloaded to CPU memory" if host else ""), host))
    if "weights" in shards:
        out.append(Term("gathered layer", 2 * m.largest_layer * 4, "the layer being computed and the next, whole"))
    return out


def peak_of(terms: list[Term]) -> int:
    """The step's peak on one device: everything resident, plus the larger of the backward's start (activations
    and logits alive) and its end (gradients filled in, activations freed), and of generation (KV cache)."""
    size = {t.name: t.bytes for t in terms if not t.host}
    transient = {"activations", "logits", "allocator retention", "gradients", "KV cache (generation)"}
    resident = sum(b for name, b in size.items() if name not in transient)
    train = max(size.get("activations", 0) + size.get("logits", 0) + size.get("allocator retention", 0),
                size.get("gradients", 0))
    return resident + max(train, size.get("KV cache (generation)", 0))


# ----------------------------------------------------------------------------------------------- the plan


def device_memory(device: str | None, gpus: int | None = None,
                  memory_bytes: int | None = None) -> tuple[str, str, int]:
    """(device kind, its name, bytes of memory): `memory_bytes` when given; CPU: total RAM; cuda: this GPU's memory,
    or an 80 GB card when there is none here."""
    import torch

    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return kind, props.name, memory_bytes or props.total_memory
        return kind, f"{gpus or 1} × GPU (none here: 80 GB assumed)", memory_bytes or GPU_DEFAULT_BYTES
    return kind, "CPU (total RAM)", memory_bytes or _total_ram()


def _total_ram() -> int:
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def verdict_of(peak: int, runtime: int, capacity: int) -> str:
    share = (peak + runtime) / capacity
    return "fits" if share <= TIGHT else "tight" if share <= 1.0 else "will not fit"


def build_plan(recipe: Recipe, source=None, train_rows: list | None = None, validation_rows: list | None = None,
               device: str | None = None, gpus: int | None = None, memory_bytes: int | None = None,
               facts: ModelFacts | None = None) -> "Plan":
    """The analytic plan: parameters, per-device memory table, steps, verdict and fixes. Rows and source are read
    from the recipe when not given (the tokenizer loads; the weights never do)."""
    if source is None or train_rows is None:
        source, train_rows, validation_rows = encoded_rows(recipe)
    if not train_rows:
        raise TunesmithError(f"{recipe.data.train}: no training rows left to plan with",
                             "see `tunesmith data preview` and rejects.jsonl for why")
    shape = shape_of(recipe.method.name)
    kind, name, capacity = device_memory(device, gpus, memory_bytes)
    if kind == "cpu" and recipe.distributed.nproc > 1:  # the processes of one machine share its memory
        capacity //= recipe.distributed.nproc
        name += f", shared by {recipe.distributed.nproc} processes"
    s = settings_of(recipe)
    if s.precision == "auto":
        s = dataclasses.replace(s, precision=_auto_precision(kind))
    if gpus and kind == "cuda" and s.world_size == 1:
        s = dataclasses.replace(s, world_size=gpus, strategy=s.strategy if s.strategy != "none" else "ddp")
    if facts is None:
        labels = len(getattr(train_rows[0], "classes", ()) or ()) or 2
        facts = model_facts(recipe, source, labels, ("lora",) if s.adapter in ("full", "freeze", "dora") else ())
    terms, peak, other, batch = estimate(facts, s, shape, train_rows, recipe.method, kind)
    steps, global_batch = count_steps(recipe, len(train_rows), shape, s.world_size)
    runtime = RUNTIME_BYTES[kind]
    plan = Plan(method=recipe.method.name, model=facts, settings=s, device=kind, device_name=name,
                capacity=capacity, terms=terms, peak=peak, runtime=runtime, other_activations=other,
                longest=batch.longest, sequences=batch.sequences, rows=len(train_rows), steps=steps,
                global_batch=global_batch, verdict=verdict_of(peak, runtime, capacity))
    if plan.verdict == "will not fit" and shape.trains:
        plan.fixes = find_fixes(plan, shape, train_rows, recipe.method)
    return plan


def _auto_precision(kind: str) -> str:
    """What `precision: auto` becomes on the device planned for (a GPU that isn't here: bf16)."""
    import torch

    from tunesmith.model import pick_precision

    if kind == "cuda" and not torch.cuda.is_available():
        return "bf16"
    return pick_precision("auto")


def find_fixes(plan: Plan, shape: Shape, rows: list, params) -> list[Fix]:
    """Changes that bring the plan under the device's memory, cheapest first, each re-estimated; when no single
    change does, the first of them combined."""
    s, out = plan.settings, []

    def attempt(what: str, why: str, new: Settings, facts: ModelFacts = plan.model) -> Fix:
        _, peak, _, _ = estimate(facts, new, shape, rows, params, plan.device)
        return Fix(what, why, peak, verdict_of(peak, plan.runtime, plan.capacity))

    b = s.batch_size
    while b > 1:
        b //= 2
        acc = s.accumulation * (s.batch_size // b)
        fix = attempt(f"train.batch_size={b} train.gradient_accumulation={acc}",
                      f"same global batch ({s.batch_size * s.accumulation} rows), smaller steps",
                      dataclasses.replace(s, batch_size=b, accumulation=acc))
        if fix.verdict != "will not fit" or b == 1:
            out.append(fix)
            break
    if not s.checkpointing:
        out.append(attempt("train.gradient_checkpointing=true", "recompute activations in the backward (~30% "
                           "slower steps)", dataclasses.replace(s, checkpointing=True)))
    if s.adapter in ("lora", "dora", "full", "freeze") and "lora" in plan.model.trainable:
        out.append(attempt("method.adapter=qlora", "4-bit base weights, LoRA on top",
                           dataclasses.replace(s, adapter="qlora"),
                           dataclasses.replace(plan.model, trainable={**plan.model.trainable,
                                                                      "qlora": plan.model.trainable["lora"]},
                                               added={**plan.model.added, "qlora": plan.model.added["lora"]})))
    length = s.max_seq_len
    while length > 64:
        length //= 2
        fix = attempt(f"train.max_seq_len={length}", "longer rows are cut (the data check counts them)",
                      dataclasses.replace(s, max_seq_len=length))
        if fix.verdict != "will not fit" or length <= 64:
            out.append(fix)
            break
    if plan.device == "cuda":
        world = max(2, s.world_size)
        while world <= 64:
            fix = attempt(f"distributed.strategy=deepspeed distributed.zero_stage=3 distributed.nproc={world}",
                          f"weights, gradients and optimizer states sharded over {world} GPUs",
                          dataclasses.replace(s, strategy="deepspeed", zero_stage=3, world_size=world))
            if fix.verdict != "will not fit" or world == 64:
                out.append(fix)
                break
            world *= 2
    good = sorted((f for f in out if f.verdict != "will not fit"), key=lambda f: out.index(f))
    if good or not out:
        return good + [f for f in out if f.verdict == "will not fit"]
    combined = dataclasses.replace(s, batch_size=1, accumulation=s.accumulation * s.batch_size, checkpointing=True)
    together = attempt(" ".join(f.what for f in out[:2]), "both together", combined)
    return [together, *out]


from tunesmith.plan_view import format_plan, gb, summary_line  # noqa: E402 - re-exported: the plan's public face


def check_fits(recipe: Recipe, source, train_rows: list, validation_rows: list,
               echo: Callable[[str], None] = print) -> Plan:
    """The plan `tunesmith train` runs before loading the model: one line, and a RunError naming the biggest term and
    the cheapest fix when the run will not fit."""
    plan = build_plan(recipe, source, train_rows, validation_rows)
    echo(summary_line(plan))
    if plan.verdict == "will not fit":
        big = plan.biggest()
        fix = next((f for f in plan.fixes if f.verdict != "will not fit"), plan.fixes[0] if plan.fixes else None)
        hint = (f"cheapest fix: {fix.what} (peak {gb(fix.peak)}, {fix.verdict})" if fix else
                "use a machine with more memory") + "; `tunesmith plan` lists every fix, or pass --force to try anyway"
        raise RunError(f"this run will not fit: peak {gb(plan.peak)} + runtime {gb(plan.runtime)} of "
                       f"{gb(plan.capacity)} on {plan.device}; the biggest term is {big.name} ({gb(big.bytes)})", hint)
    return plan
