"""Every adapter on a tiny random Llama: two steps change every trainable parameter and no frozen one, the run
folder reloads to the same logits, merging is exact where it is offered; plus the numerics of our own pieces
(bottleneck adapters, prompt-tuning logit alignment) against hand computations."""

from __future__ import annotations

import pytest
import torch
import yaml

from test_train import make_recipe, probe_logits, snapshots
from tunesmith.errors import RecipeError, RunError
from tunesmith.methods.adapters import ADAPTERS, BottleneckParams
from tunesmith.methods.sft import SFTParams
from tunesmith.recipe import load_recipe, parse_recipe
from tunesmith.train import train_run

# small settings keep each run near a second; `freeze` trains the last of the tiny model's two layers only
SETTINGS = {"lora": {"r": 4}, "qlora": {"r": 4}, "dora": {"r": 4}, "prefix": {"num_virtual_tokens": 4},
            "prompt": {"num_virtual_tokens": 4}, "bottleneck": {"size": 8}, "freeze": {"train_layers": [-1]}}


def method_for(adapter: str) -> dict:
    key = ADAPTERS[adapter].params_key
    return {"adapter": adapter, **({key: SETTINGS[key]} if key in SETTINGS else {})}


def expected_trainable(adapter: str, names: set[str]) -> bool:
    """The trainable parameters each adapter should have on the 2-layer tiny Llama (7 linear layers each)."""
    if adapter in ("lora", "qlora"):
        return len(names) == 2 * 7 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)
    if adapter == "dora":
        return len(names) == 2 * 7 * 3 and all("lora_" in n for n in names)
    if adapter == "ia3":  # peft's Llama choice: k_proj, v_proj, down_proj
        return len(names) == 2 * 3 and all(".ia3_l." in n for n in names)
    if adapter in ("prefix", "prompt"):
        return names == {"prompt_encoder.default.embedding.weight"}
    if adapter == "adapter":  # attention and MLP of 2 layers, down/up weight and bias
        return len(names) == 2 * 2 * 4 and all(".bottleneck." in n for n in names)
    if adapter == "freeze":
        return bool(names) and all(n.startswith("model.layers.1.") for n in names)
    return True  # full: checked against every parameter below


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_every_adapter_trains_reloads_and_merges(tmp_path, tiny_model_dir, chat_rows, tokenizer, adapter):
    from transformers import AutoModelForCausalLM

    from tunesmith.generate import conversations_from_prompts, export_merged, generate, load_run

    seen = {}

    recipe = make_recipe(tmp_path, tiny_model_dir, chat_rows, method=method_for(adapter),
                         data={"check": {"enabled": False}, "validation_fraction": 0}, eval={"loss_before": False})
    manifest = train_run(recipe, callbacks=[snapshots(seen)], echo=lambda s: None)
    trainable, before, after = seen["trainable"], seen["before"], seen["after"]
    assert manifest["training"]["steps"] == 2 and expected_trainable(adapter, trainable), sorted(trainable)
    if adapter == "full":
        assert trainable == set(before)
    assert [n for n in trainable if torch.equal(before[n], after[n])] == []
    assert [n for n in before if n not in trainable and not torch.equal(before[n], after[n])] == []
    assert manifest["training"]["trainable_params"] == sum(before[n].numel() for n in trainable)
    # the total counts weights, not storage: qlora's 4-bit tensors pack two weights to a byte
    base_count = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    added = 0 if adapter in ("full", "freeze") else manifest["training"]["trainable_params"]
    assert manifest["training"]["total_params"] == base_count + added
    assert manifest["saved"] == ("model" if adapter in ("freeze", "full") else "adapter")

    run = tmp_path / "run"
    from accelerate.utils import extract_model_from_parallel

    # the Trainer wraps forward in its bf16 autocast; the trained model itself is what the run folder holds
    trained = probe_logits(extract_model_from_parallel(seen["model"], keep_fp32_wrapper=False), tokenizer)
    loaded = load_run(run)
    # the same weights and the same arithmetic (qlora re-quantizes the same float weights to the same 4-bit
    # blocks and runs the same compute dtype), so the reload is exact up to summation order
    assert torch.allclose(probe_logits(loaded.model, tokenizer), trained, atol=1e-5)
    base = probe_logits(load_run(run, base=True).model, tokenizer)
    assert (base - trained).abs().max() > 1e-5  # the adapter did change the model
    answer = generate(loaded, conversations_from_prompts(["Hi"]), max_new_tokens=3)
    assert len(answer) == 1 and isinstance(answer[0], str)

    if ADAPTERS[adapter].merge is None:
        out = export_merged(run, tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(out)
        assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(probe_logits(merged, tokenizer), trained, atol=1e-4)
    else:
        with pytest.raises(RunError, match=f"can't merge a `{adapter}` adapter into its base: ") as err:
            export_merged(run, tmp_path / "merged")
        assert ADAPTERS[adapter].merge in err.value.message and not (tmp_path / "merged").exists()


# ----------------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_a_classification_head_trains_and_travels_with_every_adapter(tmp_path, tiny_model_dir, adapter):
    """task='seq-cls' (the classify method's path): the head is trainable, saved and reloaded with the adapter."""
    from tunesmith.artifacts import RunDir
    from tunesmith.methods.adapters import apply_adapter, load_base_for, load_trained, save_adapter
    from tunesmith.model import ModelSource

    params = SFTParams(**method_for(adapter))
    source = ModelSource(tiny_model_dir)
    torch.manual_seed(0)
    model = apply_adapter(load_base_for(adapter, params, source, task="seq-cls", num_labels=3), params, "seq-cls")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in names), sorted(names)
    ids, labels = torch.randint(0, 1000, (4, 6)), torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    run = RunDir(tmp_path)
    saved = save_adapter(model, params, run)
    torch.manual_seed(1)  # a freshly loaded head is initialised differently: the saved one must replace it
    base = load_base_for(adapter, params, source, task="seq-cls", num_labels=3) if saved == "adapter" else None
    reloaded = load_trained(run, {"saved": saved}, base).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------- recipe


def test_adapter_parameter_errors_name_the_dotted_path(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a b c"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  train: train.jsonl\nmethod:\n  name: sft\n  adapter: prefix\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["method.prefix.num_virtual_tokens=0", "method.bottleneck.non_linearity=swish",
                           "method.lora.r=8"])
    assert err.value.problems == [
        "`method.lora`: {'r': 8} — only `adapter: lora` reads this section, but the adapter is 'prefix'; its "
        "settings go in the `prefix` section",
        "`method.prefix.num_virtual_tokens`: 0 is out of range — it must be > 0",
        "`method.bottleneck.non_linearity`: 'swish' is not allowed; choose one of: gelu, relu, tanh"]
    recipe = load_recipe(path, ["method.adapter=adapter", "method.bottleneck.placement=[mlp]"])
    assert recipe.method.bottleneck.placement == ["mlp"]
    resolved = yaml.safe_load(recipe.to_yaml())  # every section written out, as in a run folder's recipe.yaml
    assert parse_recipe(resolved).method == recipe.method


def test_prefix_and_prompt_refuse_padding_free_rows():
    from tunesmith.methods.adapters import adapter_problems
    from tunesmith.recipe import TrainSection

    assert adapter_problems(SFTParams(adapter="prompt"), TrainSection(padding_free=True)) == [
        "`train.padding_free`: true can't train `method.adapter: prompt` — concatenated rows would share its "
        "virtual tokens; set train.padding_free=false"]
    assert adapter_problems(SFTParams(adapter="lora"), TrainSection(padding_free=True)) == []


# ----------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("adapter", ["prefix", "prompt"])
def test_trained_token_loss_lines_up_with_virtual_tokens(tiny_model_dir, adapter):
    """The loss at trained positions equals a cross-entropy computed by hand, padded rows included."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.adapters import apply_adapter
    from tunesmith.methods.common import trained_token_loss

    torch.manual_seed(0)
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), SFTParams(**method_for(adapter)))
    model.eval()
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as the collator pads
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 6:] = -100
    with torch.no_grad():
        loss, _, count, _ = trained_token_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        if adapter == "prompt":  # by hand: virtual embeddings, then the tokens; all of them attended
            n = 4
            virtual = model.prompt_encoder["default"].embedding.weight.unsqueeze(0).expand(2, -1, -1)
            embeds = torch.cat([virtual, model.get_input_embeddings()(ids)], dim=1)
            full_mask = torch.cat([torch.ones(2, n, dtype=mask.dtype), mask], dim=1)
            logits = model.base_model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, n:]
        else:  # prefix: the sequence keeps its length; compare with every position's logits
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        alone = model(input_ids=ids[1:, :6]).logits  # the padded row on its own
        padded = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape[1] == ids.shape[1] == padded.shape[1]
    assert int(count) == 5 + 2 and torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(padded[1:, :6], alone, atol=1e-5)


def test_a_fresh_bottleneck_leaves_the_model_unchanged(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.bottleneck import add_bottleneck, bottleneck_state

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = probe_logits(model, tokenizer)
    names = add_bottleneck(model, BottleneckParams(size=8))
    assert names == [f"model.layers.{i}.{b}.bottleneck" for i in (0, 1) for b in ("self_attn", "mlp")]
    assert len(bottleneck_state(model)) == 16
    assert torch.equal(probe_logits(model, tokenizer), before)
    model.model.layers[0].mlp.bottleneck.up.bias.data.fill_(0.5)  # and a non-zero one does change it
    assert not torch.allclose(probe_logits(model, tokenizer), before, atol=1e-3)


@pytest.mark.parametrize("non_linearity, expected", [("relu", [3.6, 3.9]), ("tanh", [1.0 + 2 * 0.8482836 + 0.1,
                                                                                    0.25 + 3 * 0.8482836 - 0.1])])
def test_a_hand_set_bottleneck_gives_the_hand_computed_output(non_linearity, expected):
    from tunesmith.methods.bottleneck import Bottleneck

    b = Bottleneck(hidden=2, size=1, non_linearity=non_linearity)
    with torch.no_grad():
        b.down.weight.copy_(torch.tensor([[1.0, -1.0]]))
        b.down.bias.fill_(0.5)
        b.up.weight.copy_(torch.tensor([[2.0], [3.0]]))
        b.up.bias.copy_(torch.tensor([0.1, -0.1]))
        # down: 1 - 0.25 + 0.5 = 1.25; relu 1.25 (tanh 0.8483); up: [2, 3] * that + [0.1, -0.1]; plus h
        out = b(torch.tensor([[1.0, 0.25]]))
    assert torch.allclose(out, torch.tensor([expected]), atol=1e-6)


def test_bottleneck_updates_survive_bf16_autocast():
    """A 1e-3 update to an output of 100 is below bf16's resolution (0.5 there); the adapter keeps it in fp32."""
    from tunesmith.methods.bottleneck import Bottleneck

    b = Bottleneck(hidden=4, size=2, non_linearity="relu")
    with torch.no_grad():
        b.up.bias.fill_(1e-3)
    h = torch.full((1, 3, 4), 100.0, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = b(h)
    assert out.dtype == torch.float32 and torch.allclose(out - 100.0, torch.full_like(out, 1e-3), atol=1e-6)
    assert b(h).dtype == torch.bfloat16  # outside autocast it keeps the model's dtype


def test_bottlenecks_fit_bert_style_encoders_too():
    """Encoders (the classify method's minilm) get theirs after the attention and feed-forward output projections."""
    from transformers import BertConfig, BertForSequenceClassification

    from tunesmith.methods.bottleneck import add_bottleneck

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32)).eval()
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        names = add_bottleneck(model, BottleneckParams(size=4))
        assert torch.equal(model(input_ids=ids).logits, before)
    assert names == [f"bert.encoder.layer.{i}.{b}.bottleneck" for i in (0, 1)
                     for b in ("attention.output.dense", "output.dense")]
