"""What a plan is computed from: the method's shape, the model (config.json and exact parameter counts from the
model built on torch's `meta` device with the recipe's adapter — no weights), and the encoded rows (the longest batch,
the optimizer steps). plan.py turns them into memory per device."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from tunesmith.methods.base import Shape
from tunesmith.recipe import Recipe


def shape_of(method: str) -> Shape:
    """How the method named `method` uses memory (its `Method.shape`)."""
    from tunesmith.methods import REGISTRY

    return REGISTRY[method].shape if method in REGISTRY else Shape()


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs of the model: its shape from config.json and parameter counts from the meta model."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # key/value heads × head dim
    vocab: int
    total: int  # parameters (the head included)
    linear: int  # parameters of the decoder layers' linear layers (what qlora stores in 4 bits)
    largest_layer: int  # parameters of one decoder layer (what fsdp / ZeRO-3 gather at a time)
    trainable: dict[str, int] = field(default_factory=dict)  # adapter -> trainable parameters
    added: dict[str, int] = field(default_factory=dict)  # adapter -> parameters it adds to the model (LoRA's A, B…)
    reward_params: int = 0  # the reward run's model (grpo, rloo, ppo with method.reward_model)


def model_facts(recipe: Recipe, source, num_labels: int = 2, adapters: tuple[str, ...] = ()) -> ModelFacts:
    """The model's shape and exact parameter counts (the recipe's adapter, and `adapters`), without its weights."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    shape = shape_of(recipe.method.name)
    with torch.device("meta"):
        model = _meta_model(config, shape.task, num_labels)
    total = sum(p.numel() for p in model.parameters())
    linear, layer = _linear_params(model)
    trainable, added = {}, {}
    for name in dict.fromkeys((getattr(recipe.method, "adapter", "full"), *adapters)):
        trainable[name], wrapped = _wrapped_counts(recipe, config, shape, num_labels, name)
        added[name] = wrapped - total
    return ModelFacts(name=source.describe(), layers=text.num_hidden_layers, hidden=text.hidden_size,
                      intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                      kv_width=getattr(text, "num_key_value_heads", heads) * head_dim, vocab=text.vocab_size,
                      total=total, linear=linear, largest_layer=layer, trainable=trainable, added=added,
                      reward_params=_reward_params(recipe.method))


def _meta_model(config, task: str, num_labels: int):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "seq-cls":
        config = copy.deepcopy(config)
        config.num_labels = num_labels
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def _linear_params(model) -> tuple[int, int]:
    """(parameters of the decoder layers' linear layers, parameters of the largest decoder layer)."""
    from torch import nn

    from tunesmith.methods.bottleneck import decoder_layers

    _, layers = decoder_layers(model)
    linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    return linear, max(sum(p.numel() for p in layer.parameters()) for layer in layers)


def _wrapped_counts(recipe: Recipe, config, shape: Shape, num_labels: int, adapter: str) -> tuple[int, int]:
    """(trainable, total) parameters under `adapter`: the meta model wrapped exactly as the method wraps it (a
    value head counted as trainable)."""
    import torch

    from tunesmith.methods.adapters import AdapterParamsMixin, apply_adapter

    if not shape.trains:
        with torch.device("meta"):
            return 0, sum(p.numel() for p in _meta_model(config, shape.task, num_labels).parameters())
    params = recipe.method
    if getattr(params, "adapter", None) != adapter:
        params = AdapterParamsMixin(adapter=adapter) if not hasattr(params, "adapter") else \
            params.model_copy(update={"adapter": adapter})
    if adapter == "prompt" and params.prompt.init_text:  # same count; the text's embeddings need real weights
        params = params.model_copy(update={"prompt": params.prompt.model_copy(update={"init_text": None})})
    with torch.device("meta"):
        model = apply_adapter(_meta_model(config, shape.task, num_labels), params, shape.task)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = config.get_text_config().hidden_size + 1 if shape.value_head else 0
    return count + head, sum(p.numel() for p in model.parameters()) + head


def _reward_params(params) -> int:
    """Parameters of the reward model a run scores replies with (its manifest's count; 0 for a function)."""
    import json
    from pathlib import Path

    folder = getattr(params, "reward_model", None)
    if not folder:
        return 0
    try:
        return int(json.loads((Path(folder) / "manifest.json").read_text())["training"]["total_params"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# ----------------------------------------------------------------------------------------------- the rows


def row_sequences(row) -> list[tuple[int, int]]:
    """Each sequence the model runs for one encoded row: (length, first position whose next token is labelled)."""
    if hasattr(row, "rejected_ids"):  # reward pairs
        return [(len(row.input_ids), 0), (len(row.rejected_ids), 0)]
    labels = list(getattr(row, "labels", []) or [])
    if len(labels) != len(row.input_ids):  # classification rows: one label id for the whole text
        return [(len(row.input_ids), 0)]
    if hasattr(row, "rejected") and hasattr(row, "chosen"):  # a preference pair: prompt+chosen, prompt+rejected
        cut = _second_prompt(labels)
        return [(cut, _first_label(labels[:cut])), (len(labels) - cut, _first_label(labels[cut:]))]
    return [(len(labels), _first_label(labels))]


def _first_label(labels: list[int]) -> int:
    return max(0, next((i for i, x in enumerate(labels) if x != -100), len(labels)) - 1)


def _second_prompt(labels: list[int]) -> int:
    """Where the second sequence of a concatenated pair starts: after the first labelled run."""
    seen = False
    for i, x in enumerate(labels):
        if x != -100:
            seen = True
        elif seen:
            return i
    return len(labels)


@dataclass(frozen=True)
class Batch:
    """The worst micro-batch: the longest sequences, and the positions the loss projects to the vocabulary."""

    sequences: int
    longest: int
    loss_positions: int  # per sequence (union over the batch, as trained_token_loss keeps them)


def longest_batch(rows: list, batch_size: int, max_seq_len: int, extra: int = 1, prompt_only: int = 0) -> Batch:
    """The batch of the `batch_size` longest rows (each row's sequences, cut to `max_seq_len`)."""
    seqs = sorted((s for row in rows for s in row_sequences(row)), key=lambda s: -s[0])
    per_row = max(1, len(row_sequences(rows[0]))) if rows else 1
    top = seqs[:batch_size * per_row] or [(1, 0)]
    longest = min(max_seq_len, top[0][0] + prompt_only)
    start = min(s[1] for s in top)
    return Batch(sequences=batch_size * per_row * extra, longest=longest,
                 loss_positions=max(1, min(longest, top[0][0]) - min(start, longest - 1)))


def count_steps(recipe: Recipe, rows: int, shape: Shape, world: int) -> tuple[int, int]:
    """(optimizer steps, rows per optimizer step across devices), as the trainer counts them."""
    t, p = recipe.train, recipe.method
    if recipe.method.name == "ppo":
        size = p.rollout_batch_size or t.batch_size
        return (t.max_steps or max(1, math.ceil(t.epochs * rows / size))), size
    per_step = t.batch_size * t.gradient_accumulation * world
    if shape.generates:  # batch_size counts replies; num_generations replies share one prompt
        rows = rows * getattr(p, "num_generations", 1)
    batches = math.ceil(rows / (t.batch_size * world))
    per_epoch = max(1, batches // t.gradient_accumulation)
    return (t.max_steps or math.ceil(t.epochs * per_epoch)), per_step


def encoded_rows(recipe: Recipe):
    """(model source, training rows, validation rows) as `tunesmith train` encodes them, without loading weights."""
    from tunesmith.data import prepare_data
    from tunesmith.methods import REGISTRY
    from tunesmith.model import load_tokenizer, resolve_model
    from tunesmith.train import encode_rows

    method = REGISTRY[recipe.method.name]
    data = prepare_data(recipe.data, recipe.train.seed, method.record_types)
    source = resolve_model(recipe.model.name, recipe.model.cache_dir)
    encoded = (method.encode or encode_rows)(data, load_tokenizer(source), recipe)
    return source, encoded.train, encoded.validation
