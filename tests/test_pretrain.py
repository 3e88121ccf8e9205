"""method: pretrain — documents packed into blocks with hand-counted tokens, position ids that restart per document,
no attention or loss across documents (logits equal the document run alone), a short run that learns, and eval's
perplexity on held-out text."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_jsonl
from test_train import snapshots
from tunesmith.data.format import IGNORE, encode_text
from tunesmith.errors import RecipeError
from tunesmith.methods.pretrain import BlockCollator, PackedBlock, encode_documents, pack
from tunesmith.recipe import parse_recipe

# tokens with the SmolLM2 tokenizer (no BOS; EOS appended): 8+1, 4+1, 22+1, 3+1, 2+1 = 44
DOCS = ["The river runs past the old mill.", "Stones sink.",
        "A long document about clouds, rain and the sea that keeps going for a while, longer than one block.",
        "Short note.", "Wind."]
HELD_OUT = ["The mill stands by the river.", "Clouds bring rain to the sea."]


def make_recipe(tmp_path, model_dir, method=None, validation=None, **train):
    data = {"train": str(write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])),
            "validation_fraction": 0, "check": {"enabled": False}}
    if validation:
        data["validation"] = str(write_jsonl(tmp_path / "held_out.jsonl", [{"text": d} for d in validation]))
    settings = {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-2, "max_seq_len": 64, "log_every": 1,
                "seed": 7, **train}
    return parse_recipe({"model": {"name": str(model_dir)}, "data": data,
                         "method": {"name": "pretrain", "block_size": 16, **(method or {})}, "train": settings,
                         "eval": {"loss_rows": 4}, "output": {"dir": str(tmp_path / "run")}})


def test_documents_pack_into_blocks_with_hand_counted_tokens(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.data import prepare_data

    recipe = make_recipe(tmp_path, tiny_model_dir)
    rows = encode_documents(prepare_data(recipe.data, 7, ("text",)), tokenizer, recipe)
    # 44 tokens in blocks of 16: [9 + 5 + 2 of the long one], [16 more of it], [its last 5 + 4 + 3]
    assert [len(b.input_ids) for b in rows.train] == [16, 16, 12] and rows.validation == [] and rows.rejects == []
    assert [b.position_ids for b in rows.train] == [
        [*range(9), *range(5), *range(2)], list(range(16)), [*range(5), *range(4), *range(3)]]
    starts = [[i for i, x in enumerate(b.labels) if x == IGNORE] for b in rows.train]
    assert starts == [[0, 9, 14], [0], [0, 5, 9]]  # nothing predicts a segment's first token
    assert sum(b.trained_tokens for b in rows.train) == 44 - 7  # every token but the 7 segment starts
    ids = [t for b in rows.train for t in b.input_ids]
    assert ids == [t for d in DOCS for t in encode_text(tokenizer, d)[0]]  # in order, nothing lost or padded
    assert ids.count(tokenizer.eos_token_id) == 5


def test_pack_keeps_a_short_last_block_and_the_collator_pads_it_as_its_own_segment():
    blocks = pack([[11, 12, 13], [21, 22, 23, 24, 25, 26, 27], [31]], block_size=4)
    assert [b.input_ids for b in blocks] == [[11, 12, 13, 21], [22, 23, 24, 25], [26, 27, 31]]
    assert [b.position_ids for b in blocks] == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0]]
    assert [b.labels for b in blocks] == [[IGNORE, 12, 13, IGNORE], [IGNORE, 23, 24, 25], [IGNORE, 27, IGNORE]]
    assert [b.full_length for b in blocks] == [4, 4, 3]
    batch = BlockCollator(pad_id=0)([{k: getattr(b, k) for k in PackedBlock.COLUMNS} for b in blocks[1:]])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask
    assert batch["input_ids"].tolist() == [[22, 23, 24, 25], [26, 27, 31, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 23, 24, 25], [IGNORE, 27, IGNORE, IGNORE]]


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_a_packed_document_sees_nothing_of_its_neighbours(tiny_model_dir, tokenizer, adapter):
    """Logits of document B inside a packed batch equal B's logits run alone; the loss is the per-document sum."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.common import trained_token_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if adapter:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    docs = [encode_text(tokenizer, d)[0] for d in DOCS[:2] + DOCS[3:]]  # 9, 5, 4, 3 tokens
    blocks = pack(docs, block_size=12)  # [9 + 3 of B] [2 of B + 4 + 3 + 3 of padding in the batch]
    batch = BlockCollator(tokenizer.pad_token_id)([{k: getattr(b, k) for k in PackedBlock.COLUMNS} for b in blocks])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        alone = [model(input_ids=torch.tensor([d])).logits[0] for d in docs]
        loss, _, count, _ = trained_token_loss(model, batch)
    assert (packed[0, 9:12] - alone[1][:3]).abs().max() < 1e-4  # B, after A in the same block
    assert (packed[1, 2:6] - alone[2]).abs().max() < 1e-4  # the third document, after B's continuation
    assert (packed[1, 6:9] - alone[3]).abs().max() < 1e-4
    assert (packed[0, :9] - alone[0]).abs().max() < 1e-4
    # the loss: each document's own next-token cross-entropy; B's tail is scored on its own (restarted) context
    with torch.no_grad():
        tail = model(input_ids=torch.tensor([docs[1][3:]])).logits[0]
    pieces = [(alone[0], docs[0]), (alone[1][:3], docs[1][:3]), (tail, docs[1][3:]), (alone[2], docs[2]),
              (alone[3], docs[3])]
    total = sum(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum") for logits, ids in pieces)
    assert int(count) == sum(len(ids) - 1 for _, ids in pieces) == 21 - 5
    assert loss.item() == pytest.approx(total.item() / int(count), rel=1e-5)


def test_two_steps_move_every_adapter_weight_and_eval_reports_perplexity(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.evaluation.runner import EvalOptions, evaluate_run
    from tunesmith.train import train_run

    seen = {}
    recipe = make_recipe(tmp_path, tiny_model_dir, validation=HELD_OUT, max_steps=3, precision="fp32")
    manifest = train_run(recipe, callbacks=[snapshots(seen)], echo=lambda s: None)
    assert manifest["method"] == "pretrain" and manifest["saved"] == "adapter" and manifest["training"]["steps"] == 3
    assert manifest["data"]["train_tokens"]["tokens"] == 44 and manifest["data"]["train_tokens"]["rows"] == 3
    trainable = seen["trainable"]
    assert len(trainable) == 2 * 7 * 2  # 2 layers × 7 linear modules × (A, B)
    assert [n for n in trainable if torch.equal(seen["before"][n], seen["after"][n])] == []
    assert [n for n in seen["before"] if n not in trainable
            and not torch.equal(seen["before"][n], seen["after"][n])] == []
    losses = manifest["losses"]
    assert losses["train_after"] < losses["train_before"]
    assert losses["validation_after"] < losses["validation_before"]

    results = evaluate_run(tmp_path / "run", EvalOptions(against=("base",)), echo=lambda s: None)
    assert results["task"] == "lm" and results["primary_metric"] == "perplexity" and results["rows"] == 2
    tokens = sum(len(encode_text(tokenizer, d)[0]) - 1 for d in HELD_OUT)  # each token after a document's first
    examples = [json.loads(x) for x in (tmp_path / "run" / "eval" / "heldout" / "examples.jsonl").read_text()
                .splitlines()]
    for system in ("tuned", "base"):
        m = results["metrics"][system]
        assert m["tokens"] == tokens == sum(e[system]["tokens"] for e in examples)
        nll = sum(e[system]["nll"] for e in examples)
        assert m["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)
    assert results["metrics"]["tuned"]["perplexity"] < results["metrics"]["base"]["perplexity"]


def test_bad_pretrain_settings_name_the_field(tmp_path, tiny_model_dir):
    with pytest.raises(RecipeError) as err:
        make_recipe(tmp_path, tiny_model_dir, method={"adapter": "prefix", "block_size": 4})
    problems = err.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("`method.adapter`: 'prefix'") and "virtual tokens" in problems[0]
    assert problems[1] == "`method.block_size`: 4 is out of range — it must be > 8"
