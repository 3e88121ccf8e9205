"""The continuous-batching engine on a tiny random Llama and two tiny LoRA runs of it: answers identical to the
generation path while requests join and leave a running batch, per-request seeds, stop strings, limits, and
adapters mixed in one batch, loaded and unloaded while others decode."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from test_train import make_recipe
from tunesmith.errors import RunError
from tunesmith.serve.engine import Engine, GenRequest, QueueFull, _safe_end, _Seq, Stream
from tunesmith.train import train_run

PROMPTS = ["Hi", "What is 3 plus 3?", "Tell me a long story about a cat and a dog who meet in the park one day",
           "Say something kind, please"]


@pytest.fixture(scope="module")
def lively_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama whose weights are large enough that greedy answers differ from prompt to prompt (the
    conftest model answers every prompt with the same token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("lively-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lora_run(folder, model_dir, seed: int, method: dict | None = None):
    """A two-step LoRA run (or `method`); a large learning rate so that two runs answer differently."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(20)]
    folder.mkdir(parents=True, exist_ok=True)
    recipe = make_recipe(folder, model_dir, rows, method=method or {"adapter": "lora", "lora": {"r": 4}},
                         seed=seed,
                         learning_rate=0.05, data={"check": {"enabled": False}, "validation_fraction": 0},
                         eval={"loss_before": False})
    train_run(recipe, echo=lambda s: None)
    return folder / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, lively_model_dir):
    return {name: lora_run(tmp_path_factory.mktemp(name), lively_model_dir, seed) for name, seed in (("a", 7),
                                                                                                     ("b", 8))}


@pytest.fixture
def served(runs):
    """The engine serving run a; stopped after the test."""
    from tunesmith.generate import load_run

    engine = Engine(load_run(runs["a"]), max_batch=8, max_waiting=8).start()
    yield engine
    engine.stop()


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids tunesmith generate feeds the model for one user prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def alone(loaded, ids: list[int], max_new_tokens: int = 8) -> list[int]:
    """The new token ids model.generate gives for this prompt on its own (greedy)."""
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)).long(),
                                    generation_config=loaded.generation_config, max_new_tokens=max_new_tokens,
                                    do_sample=False)
    return out[0, len(ids):].tolist()


def staggered(engine, requests: list[GenRequest]) -> list[Stream]:
    """Submit each request once the previous one has sent its first text: each joins a batch already decoding."""
    streams = []
    for req in requests:
        if streams:
            next(iter(streams[-1]), None)
        streams.append(engine.submit(req))
    return [s.wait(30) for s in streams]


def test_greedy_answers_match_generate_while_requests_join_a_running_batch(served, runs):
    from tunesmith.generate import conversations_from_prompts, generate

    loaded, tok = served.loaded, served.tokenizer
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == 4  # prompts of four lengths
    streams = staggered(served, [GenRequest(i, max_new_tokens=8) for i in ids])
    for earlier, later in zip(streams, streams[1:]):
        assert earlier.first_token_at < later.started_at < earlier.finished_at  # joined a batch mid-decode
    expected = [alone(loaded, i) for i in ids]
    assert [s.token_ids for s in streams] == expected
    assert len({tuple(e) for e in expected}) == 4  # the prompts get different answers
    answers = generate(loaded, conversations_from_prompts(PROMPTS), max_new_tokens=8)
    assert [s.text.strip() for s in streams] == answers
    for s, i in zip(streams, ids):
        assert (s.finish_reason, s.prompt_tokens, s.completion_tokens) == ("length", len(i), 8)
        assert s.queued_at <= s.started_at <= s.first_token_at <= s.finished_at
    assert served.running == 0 and served.waiting == 0


def test_many_requests_joining_and_leaving_a_small_batch_answer_as_alone(runs):
    import random

    from tunesmith.generate import load_run

    loaded, rng = load_run(runs["a"]), random.Random(0)
    engine = Engine(loaded, max_batch=3, max_waiting=32).start()
    words = "the cat dog sat on a mat and ran far away into woods while birds sang".split()
    jobs = []
    for k in range(24):  # prompts of 1-30 words and answers of 1-12 tokens: the batch grows, shrinks and queues
        ids = prompt_ids(loaded.tokenizer, " ".join(rng.choices(words, k=rng.randint(1, 30))))
        n = rng.randint(1, 12)
        stream = engine.submit(GenRequest(ids, n))
        if k % 7 == 3:
            stream.cancel()
        jobs.append((ids, n, stream))
        time.sleep(rng.random() * 0.005)
    reasons = [s.wait(30).finish_reason for _, _, s in jobs]
    engine.stop()
    assert reasons.count("cancelled") >= 1 and set(reasons) <= {"cancelled", "length", "stop"}
    assert [s.token_ids for _, _, s in jobs if s.finish_reason != "cancelled"] == \
        [alone(loaded, ids, n) for ids, n, s in jobs if s.finish_reason != "cancelled"]


def test_the_same_seed_samples_the_same_answer_alone_and_in_a_batch(served):
    tok = served.tokenizer
    sampled = GenRequest(prompt_ids(tok, PROMPTS[1]), max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    solo = served.submit(sampled).wait(30).token_ids
    others = [GenRequest(prompt_ids(tok, p), max_new_tokens=8, temperature=1.0, seed=5) for p in PROMPTS[2:]]
    batch = staggered(served, [others[0], sampled, others[1]])
    assert batch[1].token_ids == solo
    other_seed = served.submit(GenRequest(sampled.prompt_ids, 8, temperature=1.0, top_p=0.9, seed=124)).wait(30)
    assert other_seed.token_ids != solo  # the seed is what fixes the answer
    assert solo != alone(served.loaded, sampled.prompt_ids)  # it sampled, not greedy


def test_stop_strings_cut_the_text_and_never_reach_the_stream(served):
    tok = served.tokenizer
    ids = prompt_ids(tok, PROMPTS[0])
    full = served.submit(GenRequest(ids, 8)).wait(30)
    # a stop string that starts inside the third token: its first characters arrive a token before the match
    start = len(tok.decode(full.token_ids[:3], skip_special_tokens=True)) - 2
    stop = full.text[start:start + 6]
    cut = served.submit(GenRequest(ids, 8, stop=("never-there", stop)))
    events = list(cut)
    cut.wait(30)
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(e.text for e in events) == cut.text
    sent = [t for e in events for t in e.token_ids]
    assert sent == cut.token_ids[:len(sent)] and len(sent) >= 3
    assert cut.completion_tokens < 8


def test_held_back_text_is_a_possible_stop_start_or_a_broken_character():
    assert _safe_end("the cat sat", ("at the",)) == len("the cat s")  # "at" may grow into "at the"
    assert _safe_end("the cat sat", ("dog",)) == len("the cat sat")
    assert _safe_end("the cat sa", ("sat", "a sa")) == len("the cat ")  # the longer possible start wins
    assert _safe_end("naïve \ufffd", ()) == len("naïve ")


def test_streamed_text_never_splits_a_character(tokenizer):
    text = "日本語のテキスト, naïve café 🎉!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode(ids[:k]) for k in range(1, len(ids)))  # tokens split characters
    stream = Stream(GenRequest([1], max_new_tokens=len(ids)))
    seq = _Seq(stream, stop_ids=set(), tokenizer=tokenizer)
    reasons = [seq.push(t) for t in ids]
    stream._finish(reasons[-1])
    events = list(stream)
    assert reasons[-1] == "length" and reasons[:-1] == [None] * (len(ids) - 1)
    assert all("\ufffd" not in e.text for e in events) and "".join(e.text for e in events) == text
    assert [t for e in events for t in e.token_ids] == ids


def test_end_of_turn_ids_stop_and_max_new_tokens_gives_length(served):
    ids = prompt_ids(served.tokenizer, PROMPTS[1])
    first = served.submit(GenRequest(ids, 8)).wait(30)
    served.stop_ids = {first.token_ids[2]}  # as if the third answer token were the run's end-of-turn token
    ended = served.submit(GenRequest(ids, 8)).wait(30)
    assert (ended.finish_reason, ended.token_ids) == ("stop", first.token_ids[:3])
    assert ended.text == served.tokenizer.decode(first.token_ids[:3], skip_special_tokens=True)
    one = served.submit(GenRequest(ids, 1)).wait(30)
    assert (one.finish_reason, one.completion_tokens) == ("length", 1)


def test_the_waiting_queue_is_bounded(runs):
    from tunesmith.generate import load_run

    engine = Engine(load_run(runs["a"]), max_batch=2, max_waiting=2)  # not started: nothing leaves the queue
    streams = [engine.submit(GenRequest([1, 2, 3], 4)) for _ in range(2)]
    with pytest.raises(QueueFull, match="2 requests already wait"):
        engine.submit(GenRequest([1, 2, 3], 4))
    assert engine.waiting == 2
    engine.start()
    assert [s.wait(30).finish_reason for s in streams] == ["length", "length"]
    engine.submit(GenRequest([1, 2, 3], 4)).wait(30)  # room again
    engine.stop()


def test_timeouts_and_cancels_end_requests_where_they_are(served):
    ids = prompt_ids(served.tokenizer, PROMPTS[0])
    queued = served.submit(GenRequest(ids, 8, timeout_s=0.0)).wait(30)
    assert (queued.finish_reason, queued.completion_tokens) == ("timeout", 0)
    running = served.submit(GenRequest(ids, 200, timeout_s=0.05)).wait(30)
    assert running.finish_reason == "timeout" and 0 < running.completion_tokens < 200
    assert running.finished_at - running.queued_at < 1.0
    long = served.submit(GenRequest(ids, 200))
    next(iter(long), None)
    long.cancel()
    assert long.wait(30).finish_reason == "cancelled" and long.completion_tokens < 200
    assert served.submit(GenRequest(ids, 3)).wait(30).finish_reason == "length"  # the engine goes on


def test_two_adapters_in_one_batch_answer_as_each_alone(served, runs):
    from tunesmith.generate import load_run

    served.load_adapter("b", runs["b"])
    assert served.adapters == ["b"]
    tok = served.tokenizer
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    names = [None, "b", "b", None]
    streams = staggered(served, [GenRequest(i, 8, adapter=n) for i, n in zip(ids, names)])
    loaded = {None: load_run(runs["a"]), "b": load_run(runs["b"])}  # each run on its own, no other adapter loaded
    expected = [alone(loaded[n], i) for i, n in zip(ids, names)]
    assert [s.token_ids for s in streams] == expected
    assert expected[0] != alone(loaded["b"], ids[0])  # the two adapters answer differently
    with pytest.raises(RunError, match="already loaded"):
        served.load_adapter("b", runs["b"])


def test_unloading_waits_for_its_requests_and_fails_no_other(served, runs):
    from tunesmith.generate import load_run

    served.load_adapter("b", runs["b"])
    ids = prompt_ids(served.tokenizer, PROMPTS[2])
    on_b = served.submit(GenRequest(ids, 24, adapter="b"))
    on_a = served.submit(GenRequest(ids, 24))
    next(iter(on_b), None)
    unloaded = threading.Event()
    worker = threading.Thread(target=lambda: (served.unload_adapter("b"), unloaded.set()))
    worker.start()
    time.sleep(0.01)
    with pytest.raises(RunError, match="no adapter 'b'"):  # refused as soon as its unload began
        served.submit(GenRequest(ids, 4, adapter="b"))
    worker.join(30)
    assert unloaded.is_set() and on_b.done and on_a.done
    assert (on_b.finish_reason, on_a.finish_reason) == ("length", "length")
    assert on_b.token_ids == alone(load_run(runs["b"]), ids, 24)
    assert on_a.token_ids == alone(load_run(runs["a"]), ids, 24)
    assert served.adapters == [] and "b" not in served.model.peft_config
    assert served.submit(GenRequest(ids, 8)).wait(30).token_ids == alone(served.loaded, ids)  # served as before


def test_adapters_load_only_beside_a_lora_run_of_the_same_base(runs, lively_model_dir, tiny_model_dir, tmp_path):
    from tunesmith.errors import ModelError
    from tunesmith.generate import load_run

    base_engine = Engine(load_run(runs["a"], base=True))
    with pytest.raises(RunError, match="not a LoRA adapter run"):
        base_engine.load_adapter("b", runs["b"])
    other_base = lora_run(tmp_path / "other", tiny_model_dir, seed=7)
    engine = Engine(load_run(runs["a"]))
    with pytest.raises(RunError, match="must share their base model"):
        engine.load_adapter("other", other_base)
    prefix = lora_run(tmp_path / "prefix", lively_model_dir, seed=7,
                      method={"adapter": "prefix", "prefix": {"num_virtual_tokens": 4}})
    with pytest.raises(RunError, match="a `prefix` run can't be served beside another adapter"):
        engine.load_adapter("prefix", prefix)
    assert engine.adapters == []
    with pytest.raises(ModelError, match="prefix and prompt tuning adapters"):
        Engine(load_run(prefix))


def test_a_failing_prompt_ends_only_its_own_request(served):
    ids = prompt_ids(served.tokenizer, PROMPTS[2])
    good = served.submit(GenRequest(ids, 16))
    next(iter(good), None)
    bad = served.submit(GenRequest([len(served.tokenizer) + 10], 4)).wait(30)  # no such token: the embedding fails
    assert bad.finish_reason == "error" and "IndexError" in bad.error and bad.completion_tokens == 0
    assert good.wait(30).finish_reason == "length" and good.token_ids == alone(served.loaded, ids, 16)


def test_generation_settings_the_engine_does_not_apply_are_refused(runs):
    from dataclasses import replace

    from transformers import GenerationConfig

    from tunesmith.errors import ModelError
    from tunesmith.generate import load_run

    loaded = load_run(runs["a"])
    config = GenerationConfig(eos_token_id=2, repetition_penalty=1.3)
    with pytest.raises(ModelError, match=r"sets repetition_penalty=1.3, which the batching engine does not apply"):
        Engine(replace(loaded, generation_config=config))
    engine = Engine(replace(loaded, generation_config=GenerationConfig(eos_token_id=[2, 7])))
    assert engine.stop_ids == {2, 7}  # an int or a list of end-of-turn ids
