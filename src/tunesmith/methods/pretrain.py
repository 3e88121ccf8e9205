"""Continued pretraining (`method: pretrain`): plain domain text packed into fixed-length blocks, any adapter.

Each document (a `text` record) is tokenized as data/format.encode_text does (BOS if the model uses one, the text,
EOS) and the documents are laid end to end into blocks of `block_size` tokens (default `train.max_seq_len`). A block
holds several documents; a long document runs on into the next block(s). Documents never see each other: position
ids restart at 0 where a document, or a document's continuation, starts inside a block, and transformers keeps each
such segment to itself when a batch brings position ids and no attention mask, with the KV cache off (measured: with
the cache on, packed documents attend to each other). The loss covers every token except the first of a segment:
nothing predicts a document's first token from the end of the one before.

The last block is kept as it is, shorter; a batch that holds it pads it with a segment of pad tokens of its own,
with no loss, so every batch is a plain (batch, length) tensor without an attention mask. Prefix and prompt tuning
are refused: their virtual tokens would sit in front of a whole block, shared by its documents. `tunesmith eval RUN`
reports perplexity on the held-out documents (each scored alone, unpacked). Read top to bottom: parameters,
packing, collator, trainer, train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from tunesmith.data.format import IGNORE, Encoded, encode_text, pad_token_id
from tunesmith.methods.adapters import AdapterParamsMixin
from tunesmith.methods.base import TRAINER_STRATEGIES, Method, TrainOutcome
from tunesmith.schema import MethodParams


class PretrainParams(AdapterParamsMixin, MethodParams):
    """Any adapter of methods/adapters.py but prefix and prompt tuning."""

    name: Literal["pretrain"] = "pretrain"
    block_size: int | None = Field(None, gt=8, le=2**20, description="tokens per packed block; null: "
                                                                     "train.max_seq_len")

    @field_validator("adapter")
    @classmethod
    def _keeps_documents_apart(cls, value: str) -> str:
        if value in ("prefix", "prompt"):
            raise PydanticCustomError(
                "packed_virtual_tokens", "{adapter} tuning puts virtual tokens in front of a whole packed block, "
                "so its documents would share them; choose lora, qlora, dora, ia3, adapter, freeze or full",
                {"adapter": value})
        return value


# ----------------------------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class PackedBlock(Encoded):
    """One block of packed documents: `labels` is IGNORE at each segment's first token, and `position_ids`
    restart at 0 where each segment starts."""

    position_ids: list[int] = field(default_factory=list)
    COLUMNS: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "position_ids")


@dataclass
class PackedRows:
    """Packed training and validation blocks, and the rows packing rejected (train.py's EncodedData shape)."""

    train: list[PackedBlock]
    validation: list[PackedBlock]
    rejects: list[dict[str, Any]]


def pack(documents: list[list[int]], block_size: int) -> list[PackedBlock]:
    """Lay token-id documents end to end into blocks of `block_size` tokens; the last block may be shorter."""
    blocks: list[PackedBlock] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc in documents:
        start = 0
        while start < len(doc):
            piece = doc[start:start + block_size - len(ids)]
            ids += piece
            labels += [IGNORE] + piece[1:]
            positions += range(len(piece))
            start += len(piece)
            if len(ids) == block_size:
                blocks.append(PackedBlock(ids, labels, False, block_size, position_ids=positions))
                ids, labels, positions = [], [], []
    if ids:
        blocks.append(PackedBlock(ids, labels, False, len(ids), position_ids=positions))
    return blocks


def block_size(recipe) -> int:
    """The recipe's `method.block_size`, or `train.max_seq_len` when it gives none."""
    return recipe.method.block_size or recipe.train.max_seq_len


def encode_documents(data, tokenizer, recipe) -> PackedRows:
    """Text records -> packed blocks, training and validation documents each packed on their own."""
    out = PackedRows([], [], [])
    for records, target in ((data.train, out.train), (data.validation, out.validation)):
        documents = [encode_text(tokenizer, record.data["text"])[0] for record in records]
        target.extend(pack(documents, block_size(recipe)))
    return out


class BlockCollator:
    """Stacks blocks into (batch, length) tensors of input_ids, labels and position_ids; a shorter block gets a
    segment of `pad_id` tokens of its own (no loss). No attention mask: transformers then reads each block's
    segments from its position ids."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for e in examples:
            fill = width - len(e["input_ids"])
            batch["input_ids"].append(list(e["input_ids"]) + [self.pad_id] * fill)
            batch["labels"].append(list(e["labels"]) + [IGNORE] * fill)
            batch["position_ids"].append(list(e["position_ids"]) + list(range(fill)))
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


# ----------------------------------------------------------------------------------------------- trainer


def _trainer_class():
    """transformers' Trainer with tunesmith's causal-LM loss (vocabulary logits only where a label exists)."""
    from transformers import Trainer

    from tunesmith.methods.common import token_ranks, trained_token_loss

    class PretrainTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, logits, _, _ = trained_token_loss(model, inputs, num_items_in_batch, token_ranks(self))
            return (loss, {"loss": loss, "logits": logits}) if return_outputs else loss

    return PretrainTrainer


def train(job) -> TrainOutcome:
    """Train on the packed blocks and save `adapter/` or `model/` into the run, as sft does."""
    from transformers import TrainingArguments

    from tunesmith.methods.common import MetricsCallback, run_trainer, to_dataset, trainer_arguments, watch_callbacks
    from tunesmith.methods.sft import build_model, save

    params: PretrainParams = job.recipe.method
    model = build_model(job, params)
    callbacks = [MetricsCallback(job.run.metrics), *job.callbacks, *watch_callbacks(job)]
    trainer = _trainer_class()(
        model=model, args=TrainingArguments(**trainer_arguments(job)), train_dataset=to_dataset(job.train_rows),
        eval_dataset=to_dataset(job.validation_rows) if job.validation_rows else None,
        data_collator=BlockCollator(pad_token_id(job.tokenizer)), processing_class=job.tokenizer, callbacks=callbacks)
    outcome = run_trainer(job, trainer, model)
    outcome.saved = save(job, trainer.model, params)
    return outcome




METHOD = Method(
    name="pretrain",
    summary="continued pretraining on plain text, packed into blocks without attention across documents",
    params=PretrainParams,
    record_types=("text",),
    train=train,
    encode=encode_documents,
    strategies=TRAINER_STRATEGIES,
)
