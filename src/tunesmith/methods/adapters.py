"""Adapters: which weights a method trains, and how they travel through the run folder.

    lora · qlora · dora · ia3 · prefix · prompt  peft, saved as a peft folder (adapter/)
    adapter                                       Houlsby bottleneck adapters (methods/bottleneck.py), adapter/
    freeze · full                                 plain requires_grad on the model itself, saved whole (model/)

ADAPTERS is the one list; every method that trains weights shares the parameter sections (AdapterParamsMixin)
and the four steps: `load_base_for` -> `apply_adapter` -> train -> `save_adapter`; later `load_trained` and
`merge_for_export` read the run folder back. No torch at import time: the recipe checks these sections first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tunesmith.artifacts import RunDir, staged_dir
from tunesmith.errors import ModelError, RunError
from tunesmith.model import ModelSource
from tunesmith.schema import Strict


@dataclass(frozen=True)
class AdapterSpec:
    """One entry of ADAPTERS."""

    name: str
    summary: str
    params_key: str | None  # its parameter section inside the method params (`method.<key>`); None: no settings
    saved: str  # 'adapter' (peft folder adapter/), 'bottleneck' (adapter/ with our own files) or 'model' (model/)
    merge: str | None  # None when merging into the base is exact; else why it can't be


_KEEP_ADAPTER = "serve the run folder as it is: generate, chat, eval and serve load the adapter on its base"
ADAPTERS: dict[str, AdapterSpec] = {s.name: s for s in (
    AdapterSpec("lora", "low-rank updates of the linear layers", "lora", "adapter", None),
    AdapterSpec("qlora", "LoRA on a base quantized to 4-bit NormalFloat with double quantization", "qlora",
                "adapter", "the base weights are 4-bit: adding the update and re-quantizing would change the "
                           "outputs (train with adapter: lora to get a mergeable adapter)"),
    AdapterSpec("dora", "LoRA split into a learned magnitude and a low-rank direction per output", "dora",
                "adapter", None),
    AdapterSpec("ia3", "learned scales on attention keys, values and the MLP (IA3)", "ia3", "adapter", None),
    AdapterSpec("prefix", "prefix tuning: learned keys and values before the input in every layer", "prefix",
                "adapter", "prefix tuning learns extra attention keys and values, inputs rather than weights"),
    AdapterSpec("prompt", "prompt tuning: learned virtual token embeddings before the input", "prompt",
                "adapter", "prompt tuning learns extra input embeddings, not a change of weights"),
    AdapterSpec("adapter", "bottleneck adapters after each attention and MLP block (Houlsby)", "bottleneck",
                "bottleneck", "a bottleneck adapter has a non-linearity between its projections, so it can't be "
                              "folded into a linear layer"),
    AdapterSpec("freeze", "train only chosen layers or modules; everything else stays frozen", "freeze", "model",
                None),
    AdapterSpec("full", "train every weight", None, "model", None),
)}
AdapterName = Literal["lora", "qlora", "dora", "ia3", "prefix", "prompt", "adapter", "freeze", "full"]
PEFT_TYPES = {"lora": "LORA", "qlora": "LORA", "dora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING",
              "prompt": "PROMPT_TUNING"}


# ----------------------------------------------------------------------------------------------- parameters


class LoraParams(Strict):
    r: int = Field(16, gt=0, description="rank of the update matrices")
    alpha: float = Field(32, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, e.g. [q_proj, v_proj], or every linear layer")


class QLoraParams(LoraParams):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit NormalFloat (QLoRA's choice) or plain "
                                                                 "4-bit float")
    double_quant: bool = Field(True, description="quantize the quantization constants too (~0.4 bit per weight "
                                                 "saved)")
    compute_dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="matmuls of the 4-bit layers; "
                                                                               "auto: bf16 where fast")


class DoraParams(LoraParams):
    """DoRA takes LoRA's settings: the magnitude vector it adds has none of its own."""


class IA3Params(Strict):
    target_modules: list[str] | None = Field(None, description="layers that get a learned scale; null: peft's "
                                                               "per-model choice")
    feedforward_modules: list[str] | None = Field(None, description="of those, the ones scaled on their input; "
                                                                    "null: peft's choice")


class PrefixParams(Strict):
    num_virtual_tokens: int = Field(20, gt=0, description="learned key/value positions in front of every layer's "
                                                          "input")


class PromptParams(Strict):
    num_virtual_tokens: int = Field(20, gt=0, description="learned embeddings in front of every input")
    init_text: str | None = Field(None, description="start them from this text's token embeddings (e.g. the task "
                                                    "in words)")


class BottleneckParams(Strict):
    size: int = Field(64, gt=0, description="width of the bottleneck")
    non_linearity: Literal["gelu", "relu", "tanh"] = Field("gelu", description="between the down- and "
                                                                               "up-projection")
    dropout: float = Field(0.0, ge=0, lt=1, description="inside the adapter, before the up-projection")
    placement: list[Literal["attention", "mlp"]] = Field(["attention", "mlp"], min_length=1,
                                                         description="the blocks an adapter follows")


class FreezeParams(Strict):
    train_layers: list[int] = Field([-2, -1], description="transformer layers to train; negative counts from the "
                                                          "end")
    modules: list[str] | None = Field(None, description="instead: train parameters whose name contains one of "
                                                        "these, e.g. [mlp]")
    train_embeddings: bool = Field(False, description="also train the token embeddings (and the output layer when "
                                                      "it is separate)")

    @model_validator(mode="after")
    def _layers_or_modules(self):
        if self.modules is not None and self.train_layers != [-2, -1]:
            raise PydanticCustomError("freeze_choice", "set `train_layers` or `modules`, not both")
        if self.modules is not None and not self.modules:
            raise PydanticCustomError("freeze_empty", "`modules` is empty; name at least one module, or leave it out")
        return self


SECTIONS = {"lora": LoraParams, "qlora": QLoraParams, "dora": DoraParams, "ia3": IA3Params, "prefix": PrefixParams,
            "prompt": PromptParams, "bottleneck": BottleneckParams, "freeze": FreezeParams}


class AdapterParamsMixin(Strict):
    """The adapter choice and one settings section per adapter, shared by every method that trains weights.

    A section that differs from its defaults but belongs to another adapter is an error, not silently unused.
    """

    adapter: AdapterName = Field("lora", description="which weights train; each adapter's settings go in its own "
                                                     "section (`tunesmith methods` lists them)")
    lora: LoraParams = Field(LoraParams(), description="adapter: lora")
    qlora: QLoraParams = Field(QLoraParams(), description="adapter: qlora (LoRA's keys, and the quantization)")
    dora: DoraParams = Field(DoraParams(), description="adapter: dora (LoRA's keys)")
    ia3: IA3Params = Field(IA3Params(), description="adapter: ia3")
    prefix: PrefixParams = Field(PrefixParams(), description="adapter: prefix")
    prompt: PromptParams = Field(PromptParams(), description="adapter: prompt")
    bottleneck: BottleneckParams = Field(BottleneckParams(), description="adapter: adapter (bottleneck adapters)")
    freeze: FreezeParams = Field(FreezeParams(), description="adapter: freeze")

    @field_validator(*SECTIONS, mode="after")
    @classmethod
    def _section_belongs_to_the_adapter(cls, value, info):
        adapter = info.data.get("adapter")  # absent when `adapter` itself was invalid: that error says enough
        key = info.field_name
        if adapter is None or ADAPTERS[adapter].params_key == key or value == SECTIONS[key]():
            return value
        users = [s.name for s in ADAPTERS.values() if s.params_key == key]
        own = ADAPTERS[adapter].params_key
        raise PydanticCustomError(
            "unused_section", "only `adapter: {users}` reads this section, but the adapter is '{adapter}'{own}",
            {"users": " | ".join(users), "adapter": adapter,
             "own": f"; its settings go in the `{own}` section" if own else ""})

    def problems(self, train, data) -> list[str]:
        """The adapter's limits (adapter_problems), then the method's own (MethodParams.problems)."""
        return adapter_problems(self, train) + super().problems(train, data)

    def unused_keys(self) -> set[str]:
        """Every adapter section but the chosen adapter's."""
        return {key for key in SECTIONS if key != ADAPTERS[self.adapter].params_key}


def adapter_settings(params) -> Strict | None:
    """The chosen adapter's own settings section (None for `full`)."""
    key = ADAPTERS[params.adapter].params_key
    return getattr(params, key) if key else None


def adapter_problems(params, train) -> list[str]:
    """Combinations of adapter and `train` settings that can't work, in recipe wording (before any loading)."""
    out = []
    if params.adapter in ("prefix", "prompt") and train.padding_free is True:
        out.append(f"`train.padding_free`: true can't train `method.adapter: {params.adapter}` — concatenated rows "
                   "would share its virtual tokens; set train.padding_free=false")
    return out


def packs_rows(params, train) -> bool:
    """Whether a method that can lay rows end to end (sft) does: `train.padding_free`, with `auto` on unless the
    adapter's virtual tokens would be shared by the rows (prefix, prompt)."""
    if train.padding_free == "auto":
        return params.adapter not in ("prefix", "prompt")
    return train.padding_free


# ----------------------------------------------------------------------------------------------- the model


def _quiet_bitsandbytes() -> None:
    """bitsandbytes logs a warning at import on AVX512-BF16 CPUs about an optional kernel package it fetches from a
    hub; it falls back to its own kernels, so the line is noise."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def load_base_for(adapter: str, params, source: ModelSource, task: str = "causal-lm", num_labels: int | None = None,
                  dtype=None, **model_kwargs):
    """The base model the adapter trains on: quantized to 4 bits for `qlora`, else as model.load_model loads it.

    `task` is 'causal-lm' or 'seq-cls' (a classification head with `num_labels` outputs). Its attention is
    methods/attention.py's (SDPA but where a CPU runs it faster, and packed rows one sequence at a time).
    """
    from tunesmith.methods.attention import use_for_training
    from tunesmith.model import load_model

    if adapter == "qlora":
        model = _load_quantized(params.qlora, source, task, num_labels, dtype, **model_kwargs)
    else:
        model = load_model(source, dtype, task, num_labels, **model_kwargs)
    use_for_training(model)
    return model


def _load_quantized(q: QLoraParams, source: ModelSource, task: str, num_labels: int | None, dtype, **kwargs):
    """The base with its linear layers in 4 bits (bitsandbytes; runs on the CPU too); other weights in `dtype`."""
    import os

    import torch

    if source.gguf_file:
        raise ModelError(f"qlora can't quantize the GGUF file {source.describe()}",
                         "give a Hugging Face model folder (model.name: default is one: tunesmith caches it as "
                         "safetensors)")
    _quiet_bitsandbytes()
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("adapter qlora needs the bitsandbytes package", "pip install bitsandbytes") from None
    extra = {"llm_int8_skip_modules": ["score", "classifier"]} if task == "seq-cls" else {}  # heads stay float
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                bnb_4bit_use_double_quant=q.double_quant,
                                bnb_4bit_compute_dtype=_compute_dtype(q.compute_dtype), **extra)
    where = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else "cpu"
    from tunesmith.model import load_model

    model = load_model(source, dtype, task, num_labels, quantization_config=config, device_map=where, **kwargs)
    keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel (AVX512-BF16 CPUs).

    bitsandbytes 0.50 repacks a Linear4bit in place at its first forward in eval mode. After that, training
    backpropagates through a kernel with no autograd support: the gradients of every LoRA matrix below the last
    4-bit layer come out wrong (measured: layer 0's gradient off by ~80% of its size after one evaluation, which the
    loss before training already runs). Saving reverses the repack lossily (absmax via bf16; logits moved ~2e-3),
    so each checkpoint would also nudge the model. With the repack off, training, evaluation and a reloaded run
    compute the same thing.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _compute_dtype(name: str):
    import torch

    from tunesmith.model import cpu_has_fast_bf16

    if name == "auto":
        fast = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_fast_bf16()
        name = "bf16" if fast else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32


def head_modules(model) -> list[str]:
    """The task head's module names (e.g. `score`): the model's children outside its backbone that hold weights."""
    backbone = getattr(model, "base_model_prefix", "model")
    return [name for name, child in model.named_children()
            if name != backbone and any(True for _ in child.parameters())]


def apply_adapter(model, params, task: str = "causal-lm", precision: str = "fp32"):
    """Wrap or freeze `model` as `params.adapter` says; return the model to train.

    With task 'seq-cls' the classification head is trained too (and saved with the adapter).
    """
    name = params.adapter
    heads = head_modules(model) if task == "seq-cls" else []
    if name in PEFT_TYPES:
        return _apply_peft(model, params, task, heads, precision)
    if name == "adapter":
        from tunesmith.methods.bottleneck import add_bottleneck

        model.requires_grad_(False)
        add_bottleneck(model, params.bottleneck)
        _train_heads(model, heads)
        return model
    if name == "freeze":
        _freeze(model, params.freeze, heads)
        return model
    model.requires_grad_(True)  # full
    return model


def _apply_peft(model, params, task: str, heads: list[str], precision: str):
    _quiet_bitsandbytes()
    from peft import (IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit,
                      get_peft_model)

    name, s = params.adapter, adapter_settings(params)
    common: dict[str, Any] = {"task_type": "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"}
    if heads:
        common["modules_to_save"] = list(heads)
    if name in ("lora", "qlora", "dora"):
        config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                            use_dora=name == "dora", **common)
    elif name == "ia3":
        config = IA3Config(target_modules=s.target_modules, feedforward_modules=s.feedforward_modules, **common)
    elif name == "prefix":
        config = PrefixTuningConfig(num_virtual_tokens=s.num_virtual_tokens, **common)
    else:
        init = {}
        if s.init_text:
            init = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=s.init_text,
                        tokenizer_name_or_path=str(model.name_or_path))
        config = PromptTuningConfig(num_virtual_tokens=s.num_virtual_tokens, **init, **common)
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. target_modules that match no layer
        raise RunError(f"method.{ADAPTERS[name].params_key}: peft can't apply it to this model: {exc}",
                       "check the module names against the model's layers") from None
    if name in ("lora", "qlora", "dora"):
        if precision in ("bf16", "fp16"):
            keep_adapter_sums_in_fp32(model)
        use_fast_dropout(model)
    if name == "prompt" and task == "causal-lm":
        align_logits_with_inputs(model)
    return model


def _train_heads(model, heads: list[str]) -> None:
    for head in heads:
        getattr(model, head).requires_grad_(True)


def _freeze(model, f: FreezeParams, heads: list[str]) -> None:
    """Train only the chosen layers (or the modules whose names match), the heads and optionally the embeddings."""
    model.requires_grad_(False)
    if f.modules is not None:
        hits = [p for n, p in model.named_parameters() if any(m in n for m in f.modules)]
        if not hits:
            raise RunError(f"`method.freeze.modules`: {f.modules} match no parameter of {type(model).__name__}",
                           "give parts of parameter names, e.g. [mlp], [self_attn.o_proj], [norm]")
        for p in hits:
            p.requires_grad_(True)
    else:
        from tunesmith.methods.bottleneck import decoder_layers

        _, layers = decoder_layers(model)
        bad = [i for i in f.train_layers if not -len(layers) <= i < len(layers)]
        if bad:
            raise RunError(f"`method.freeze.train_layers`: {bad} out of range — the model has {len(layers)} layers "
                           f"(0 … {len(layers) - 1}, or -1 … -{len(layers)} from the end)")
        for i in f.train_layers:
            layers[i].requires_grad_(True)
    if f.train_embeddings:
        model.get_input_embeddings().requires_grad_(True)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None:
            output.requires_grad_(True)
    _train_heads(model, heads)
    if not any(p.requires_grad for p in model.parameters()):
        raise RunError("`method.freeze`: nothing left to train", "choose train_layers, modules or train_embeddings")


def trainable_weights_in_fp32(model) -> None:
    """Put trainable weights back to fp32 (TRL's trainers cast a 4-bit model's LoRA weights to bf16 at init).

    Under bf16 autocast the adapter's matmuls run in bf16 either way; fp32 master weights keep small optimizer
    updates from rounding away (the reason for keep_adapter_sums_in_fp32 too), and the saved adapter is the one
    the run computed with: peft reloads adapter weights as fp32, so bf16-trained ones answered differently (~1e-3
    in the logits of the tiny test model).
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def keep_adapter_sums_in_fp32(model) -> None:
    """Under bf16 autocast, add each LoRA update to its frozen layer's output in fp32.

    A fresh adapter's update is ~1e-3 of the layer output, below bf16's resolution (2^-8): summed in bf16 it is
    rounded away and learning stalls for the first steps (measured: loss 0.584 vs 0.532 after 12 steps). The
    frozen matmul still runs in bf16; only its output is upcast before the adapter's update is added. DoRA adds
    its update to the same output (its magnitude rescales it in fp32 then), and a 4-bit layer's output upcasts
    the same way.
    """
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.base_layer.register_forward_hook(lambda _mod, _inp, out: out.float())


def use_fast_dropout(model) -> None:
    """Give every LoRA layer a dropout that draws its CPU mask four elements per random word.

    peft's `nn.Dropout` samples one Bernoulli number per element; on the CPU that was 25-31% of a LoRA step
    (bench/sft_throughput.py: 7.1 vs 8.8 s/step with the fast mask, interleaved A/B). Same p (to 1/65536), same
    scaling; GPUs keep `F.dropout`. DoRA only asks whether its dropout is an `nn.Identity`, so it works there too.
    """
    from peft.tuners.lora import LoraLayer
    from torch import nn

    from tunesmith.methods.common import FastDropout

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, drop in list(module.lora_dropout.items()):
                if isinstance(drop, nn.Dropout) and drop.p > 0:
                    module.lora_dropout[name] = FastDropout(drop.p)


def align_logits_with_inputs(model) -> None:
    """Make a prompt-tuned model's logits line up with the caller's tokens, as a plain model's do.

    Prompt tuning puts its virtual tokens in front of the input, so the model returns `num_virtual_tokens` more
    positions and index-valued `logits_to_keep` (tunesmith's loss and label scoring use it) would point at the wrong
    ones. This hook shifts those indices past the virtual tokens, and without `logits_to_keep` (and without
    labels, where peft aligns its own) keeps only the input's positions. An int `logits_to_keep` (the last k
    positions, what generation asks for) needs no change.
    """
    import torch

    n = model.active_peft_config.num_virtual_tokens

    def hook(_module, args, kwargs):
        kwargs.pop("position_ids", None)  # peft ignores them for prompt tuning (with a warning per call)
        keep = kwargs.get("logits_to_keep", 0)
        if torch.is_tensor(keep):
            kwargs["logits_to_keep"] = keep + n
        elif keep == 0 and kwargs.get("labels") is None:
            tokens = kwargs.get("input_ids", args[0] if args else None)
            tokens = tokens if tokens is not None else kwargs["inputs_embeds"]
            kwargs["logits_to_keep"] = torch.arange(n, n + tokens.shape[1], device=tokens.device)
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)


# ----------------------------------------------------------------------------------------------- the run folder


def save_adapter(model, params, folder_root: RunDir, tokenizer=None) -> str:
    """Write what was trained into the run folder; return the manifest's `saved` value (the folder's name).

    peft adapters: a standard peft folder `adapter/`; bottleneck adapters: `adapter/bottleneck.*` (with a trained
    classification head, if any); freeze and full: the whole model in transformers format in `model/`.
    """
    from tunesmith import distributed

    with distributed.gathered(model):  # every rank enters (ZeRO-3 gathers the weights); rank 0 writes
        return _save_adapter(model, params, folder_root, tokenizer) if distributed.is_main() else \
            ADAPTERS[params.adapter].saved.replace("bottleneck", "adapter")


def _save_adapter(model, params, folder_root: RunDir, tokenizer=None) -> str:
    spec = ADAPTERS[params.adapter]
    if spec.saved == "adapter":
        with staged_dir(folder_root.adapter, replace=True) as stage:
            model.save_pretrained(stage)
        return "adapter"
    if spec.saved == "bottleneck":
        from tunesmith.methods.bottleneck import bottleneck_state, save_bottleneck

        own = set(bottleneck_state(model))
        heads = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in own}
        with staged_dir(folder_root.adapter, replace=True) as stage:
            save_bottleneck(model, params.bottleneck, stage, extra=heads)
        return "adapter"
    with staged_dir(folder_root.model, replace=True) as stage:
        model.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
    return "model"


def run_adapter(run: RunDir, manifest: dict) -> AdapterParamsMixin:
    """The adapter choice and settings a finished run was trained with (from the manifest and recipe.yaml)."""
    from pydantic import ValidationError

    recipe = run.read_recipe() if run.recipe.exists() else None
    method = (recipe or {}).get("method") or {}
    known = {k: v for k, v in method.items() if k in AdapterParamsMixin.model_fields}
    default = "lora" if manifest.get("saved") == "adapter" else "full"
    known["adapter"] = manifest.get("adapter") or known.get("adapter") or default
    try:
        return AdapterParamsMixin.model_validate(known)
    except ValidationError as exc:
        raise RunError(f"{run.recipe}: can't read the method's adapter settings: {exc.errors()[0]['msg']}",
                       "was the run written by another tunesmith version?") from None


def load_trained(run: RunDir, manifest: dict, base_model, dtype=None):
    """The trained model from a run folder: the adapter on `base_model` (loaded with load_base_for), or for runs
    that saved the whole model (`base_model` unused, may be None) that model."""
    saved = manifest.get("saved")
    if saved == "model":
        return _load_full(run, dtype)
    if saved != "adapter":
        raise RunError(f"{run.root}: manifest names unknown saved weights {saved!r}")
    from tunesmith.methods import bottleneck

    if (run.adapter / bottleneck.CONFIG).exists():
        bottleneck.load_bottleneck(base_model, run.adapter)
        return base_model
    _quiet_bitsandbytes()
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, run.adapter)
    config = model.active_peft_config
    if config.peft_type == "PROMPT_TUNING" and config.task_type == "CAUSAL_LM":
        align_logits_with_inputs(model)
    return model


def _load_full(run: RunDir, dtype=None):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    architectures = json.loads((run.model / "config.json").read_text()).get("architectures") or [""]
    auto = AutoModelForSequenceClassification if architectures[0].endswith("ForSequenceClassification") \
        else AutoModelForCausalLM
    return auto.from_pretrained(run.model, dtype=dtype or torch.float32)


def check_mergeable(adapter: str) -> None:
    """Raise a RunError saying why, when `adapter` can't be merged into its base exactly."""
    reason = ADAPTERS[adapter].merge
    if reason:
        raise RunError(f"can't merge a `{adapter}` adapter into its base: {reason}", _KEEP_ADAPTER)


def merge_for_export(model, adapter: str):
    """The adapter merged into the base weights (an ordinary transformers model), or a RunError saying why not."""
    check_mergeable(adapter)
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def merged_run_folder(run_path, folder) -> ModelSource:
    """Write a finished causal-LM run's model (its adapter merged in) to `folder`, as the starting point of another
    method (a reward model or a policy that starts from an SFT run); return it as a ModelSource."""
    from pathlib import Path

    from tunesmith.artifacts import open_run
    from tunesmith.model import resolve_model

    run = open_run(run_path)
    if not run.manifest.exists():
        raise RunError(f"{run.root}: no manifest.json — the run did not finish", "train it to the end first")
    manifest = run.read_manifest()
    params = run_adapter(run, manifest)
    if ADAPTERS[params.adapter].merge:
        raise RunError(f"{run.root}: can't start from a `{params.adapter}` run: {ADAPTERS[params.adapter].merge}",
                       "start from a run trained with lora, dora, ia3, freeze or full")
    base = None
    if manifest["saved"] == "adapter":
        bm = manifest["base_model"]
        base = load_base_for(params.adapter, params, resolve_model(bm["name"], bm.get("cache_dir")))
    model = merge_for_export(load_trained(run, manifest, base), params.adapter)
    model.save_pretrained(folder)
    return ModelSource(Path(folder), label=f"{run.root} (merged)")
