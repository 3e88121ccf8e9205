"""Supervised fine-tuning (`method: sft`): any adapter of methods/adapters.py, on TRL's SFTTrainer.

Rows arrive already formatted and masked (tunesmith.data.format); TRL supplies the loop, the padding-free
collator and checkpointing. Read top to bottom: parameters, model, trainer, save.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.methods.adapters import (AdapterParamsMixin, LoraParams, keep_adapter_sums_in_fp32,  # noqa: F401
                                        use_fast_dropout)
from tunesmith.methods.base import TRAINER_STRATEGIES, Method, TrainOutcome
from tunesmith.schema import MethodParams


class SFTParams(AdapterParamsMixin, MethodParams):
    name: Literal["sft"] = "sft"
    train_on: Literal["responses", "all"] = Field("responses", description="loss on assistant turns only, or on "
                                                                          "every token")


def train(job) -> TrainOutcome:
    """Train with SFT and save `adapter/` (peft or bottleneck adapters) or `model/` (freeze, full) into the run."""
    from trl import SFTConfig

    from tunesmith.methods.adapters import packs_rows, trainable_weights_in_fp32
    from tunesmith.methods.common import (MetricsCallback, WeightedCollator, run_trainer, to_dataset,
                                          trainer_arguments, watch_callbacks)

    params: SFTParams = job.recipe.method
    model = build_model(job, params)
    config = SFTConfig(**trainer_arguments(job), max_length=None, padding_free=packs_rows(params, job.recipe.train),
                       dataset_kwargs={"skip_prepare_dataset": True}, packing=False)
    callbacks = [MetricsCallback(job.run.metrics), *job.callbacks, *watch_callbacks(job)]
    trainer = _trainer_class()(model=model, args=config, train_dataset=to_dataset(job.train_rows),
                         eval_dataset=to_dataset(job.validation_rows) if job.validation_rows else None,
                         processing_class=job.tokenizer, callbacks=callbacks)
    trainer.data_collator = WeightedCollator(trainer.data_collator)
    trainable_weights_in_fp32(trainer.model)  # undo TRL's bf16 cast of qlora adapters (see adapters.py)
    outcome = run_trainer(job, trainer, model)
    outcome.saved = save(job, trainer.model, params)
    return outcome


def _trainer_class():
    """TRL's SFTTrainer with a loss that projects to the vocabulary only at trained positions."""
    from trl import SFTTrainer

    from tunesmith.methods.common import token_ranks, trained_token_loss

    class TunesmithSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, logits, count, correct = trained_token_loss(model, inputs, num_items_in_batch, token_ranks(self))
            mode = "train" if model.training else "eval"
            self._metrics[mode]["mean_token_accuracy"].append((correct / count.clamp(min=1)).item())
            if mode == "train":
                self._total_train_tokens += int(count)
                self._metrics[mode]["trained_tokens"] = [self._total_train_tokens]
            return (loss, {"loss": loss, "logits": logits}) if return_outputs else loss

    return TunesmithSFTTrainer


def build_model(job, params: SFTParams):
    """The base model (4-bit for qlora) with the recipe's adapter applied."""
    from transformers import set_seed

    from tunesmith.methods.adapters import apply_adapter, load_base_for

    set_seed(job.recipe.train.seed)  # adapter initialisation is random: seed it like the rest of the run
    model = load_base_for(params.adapter, params, job.source)
    model.config.use_cache = False  # padding-free batches stay separate only without the cache
    return apply_adapter(model, params, precision=job.precision)


def save(job, model, params: SFTParams) -> str:
    """Write the trained weights in plain peft / transformers format; return the folder's name."""
    from tunesmith.methods.adapters import save_adapter

    model.config.use_cache = True
    return save_adapter(model, params, job.run, job.tokenizer)


METHOD = Method(
    name="sft",
    summary="supervised fine-tuning on chats, instructions, labels or text, with any adapter",
    params=SFTParams,
    record_types=("chat", "instruction", "classification", "text", "preference"),  # preference: the chosen reply
    train=train,
    strategies=TRAINER_STRATEGIES,
)
