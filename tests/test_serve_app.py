"""`tunesmith serve`'s HTTP face against the real engine: a uvicorn server on 127.0.0.1 in a background thread,
the real `openai` package as the client (chat, streaming, adapters, errors and auth), vLLM's adapter endpoints,
classify, feedback, the request log, the metrics scrape, the start-up and export parity checks, --print-vllm."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tunesmith.cli import main

KEY = "test-key-0123456789"
QUESTION = [{"role": "user", "content": "What is 3 plus 3?"}]


def start_server(app):
    """Run `app` with uvicorn on a free loopback port in a thread; (base url, stop function)."""
    import uvicorn

    from tunesmith.serve.startup import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started

    def stop():
        server.should_exit = True
        thread.join(10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two LoRA chat runs of the tiny Llama (different seeds and rates) and a classify run."""
    from test_classify import make_recipe as classify_recipe
    from test_train import make_recipe

    from tunesmith.train import train_run

    tmp = tmp_path_factory.mktemp("serve")
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(20)]
    # rates and steps at which the tiny model answers with varied words, not the random model's blank lines
    train_run(make_recipe(tmp, tiny_model_dir, chats, name="main", learning_rate=2e-2, max_steps=15),
              echo=lambda s: None)
    train_run(make_recipe(tmp, tiny_model_dir, chats, name="second", seed=11, learning_rate=2e-2, max_steps=15),
              echo=lambda s: None)
    train_run(classify_recipe(tmp, tiny_model_dir, {"name": "classify", "adapter": "lora"}, name="clf",
                              precision="fp32"), echo=lambda s: None)
    return {"main": tmp / "main", "second": tmp / "second", "clf": tmp / "clf", "tmp": tmp}


@pytest.fixture(scope="module")
def server(runs):
    """The main run served with adapter `second` beside it, parity checked, an API key; (url, app, echo lines)."""
    from tunesmith.serve.app import ServeOptions, create_app
    from tunesmith.serve.requestlog import RequestLog
    from tunesmith.serve.startup import ServeConfig, check_served_parity, load_served

    lines: list[str] = []
    served = load_served(ServeConfig(runs["main"], adapters={"second": str(runs["second"])}), lines.append)
    check_served_parity(served, lines.append)
    app = create_app(served, RequestLog(runs["tmp"] / "requests.sqlite"),
                     ServeOptions(max_tokens=64, max_body=64 * 1024, api_key=KEY))
    app.state.ready = True
    url, stop = start_server(app)
    yield url, app, lines
    stop()
    served.engine.stop()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def scrape(url: str) -> dict[tuple, float]:
    """The /metrics page as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_parity_passed_at_start_up_and_the_server_is_ready(server, runs):
    url, app, lines = server
    assert lines[0] == f"adapter second: {runs['second']}"
    for name in ("main", "second"):  # the served run, and the adapter served beside it, each against its own run
        assert any(line.startswith(f"parity: 3/3 validation prompts answered with identical tokens by the engine "
                                   f"serving {name} and the run's generation path") for line in lines)
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").json() == {"status": "ready", "model": "main"}


def test_models_lists_the_run_and_its_adapters_with_their_parent(server, runs):
    url, _, _ = server
    models = {m.id: m for m in client(url).models.list().data}
    assert set(models) == {"main", "second"}
    assert models["second"].model_extra["parent"] == "main" and models["main"].model_extra["parent"] is None
    assert models["main"].model_extra["max_model_len"] == 256


def test_greedy_chat_equals_tunesmith_generate_for_the_run_and_each_adapter(server, runs):
    from tunesmith.generate import generate, load_run

    url, _, _ = server
    answers = {}
    for model in ("main", "second"):
        reply = client(url).chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
        expected = generate(load_run(runs[model]), [QUESTION], max_new_tokens=12)[0]
        assert reply.choices[0].message.content == expected and len(set(expected.split())) >= 2
        assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens <= 12
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        answers[model] = expected
    assert answers["main"] != answers["second"]  # the adapter answers, not the served run


def test_streamed_chunks_join_to_the_answer_and_end_with_done(server):
    url, _, _ = server
    whole = client(url).chat.completions.create(model="main", messages=QUESTION, max_tokens=12, temperature=0)
    pieces, finish = [], None
    for chunk in client(url).chat.completions.create(model="main", messages=QUESTION, max_tokens=12, temperature=0,
                                                     stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    body = {"model": "main", "messages": QUESTION, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] <= 4 and usage["prompt_tokens"] == whole.usage.prompt_tokens


def test_text_completion_and_seeded_sampling(server):
    url, app, _ = server
    reply = client(url).completions.create(model="main", prompt="The answer is", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and reply.usage.completion_tokens <= 5
    ids = app.state.served.loaded.tokenizer("The answer is")["input_ids"]
    assert reply.usage.prompt_tokens == len(ids)
    sampled = [client(url).chat.completions.create(model="main", messages=QUESTION, max_tokens=8, temperature=1.5,
                                                   top_p=0.9, seed=5).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_hot_load_and_unload_with_vllm_payloads(server, runs):
    url, _, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(runs["second"])},
                        headers=auth)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'hot' added successfully."
    again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(runs["second"])},
                       headers=auth)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert "hot" in {m.id for m in client(url).models.list().data}
    hot = client(url).chat.completions.create(model="hot", messages=QUESTION, max_tokens=8, temperature=0)
    second = client(url).chat.completions.create(model="second", messages=QUESTION, max_tokens=8, temperature=0)
    assert hot.choices[0].message.content == second.choices[0].message.content
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "hot"}, headers=auth)
    assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'hot' removed successfully."
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="hot", messages=QUESTION, max_tokens=2)
    missing = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "hot"}, headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["message"] == \
        "The lora adapter 'hot' cannot be found."
    nowhere = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(runs["tmp"] / "no")},
                         headers=auth)
    assert nowhere.status_code == 404 and nowhere.json()["error"]["param"] == "lora_path"


def test_errors_are_openai_json_with_their_codes_and_counted(server):
    url, app, _ = server
    before = scrape(url)
    with pytest.raises(openai.BadRequestError) as bad:
        client(url).chat.completions.create(model="main", messages=QUESTION, temperature=5)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as unknown:
        client(url).chat.completions.create(model="nope", messages=QUESTION)
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model="main", messages=QUESTION)
    no_key = httpx.post(f"{url}/v1/chat/completions", json={"model": "main", "messages": QUESTION})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": f"Bearer {KEY}"}
    schema = httpx.post(f"{url}/v1/chat/completions", json={"model": "main"}, headers=auth)
    assert schema.status_code == 422 and schema.json()["error"]["param"] == "messages"
    big = httpx.post(f"{url}/v1/chat/completions", content=b"{" + b" " * 70_000 + b"}", headers=auth)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as cap:
        client(url).chat.completions.create(model="main", messages=QUESTION, max_tokens=65)
    assert cap.value.body["param"] == "max_tokens"
    long = [{"role": "user", "content": "plus " * 300}]
    with pytest.raises(openai.BadRequestError) as context:
        client(url).chat.completions.create(model="main", messages=long, max_tokens=4)
    assert "maximum context length is 256 tokens" in context.value.body["message"]
    engine = app.state.served.engine
    engine.max_waiting = 0  # the real engine's queue, full
    try:
        with pytest.raises(openai.RateLimitError) as full:
            client(url).chat.completions.create(model="main", messages=QUESTION, max_tokens=2)
    finally:
        engine.max_waiting = 64
    assert full.value.body["code"] == "queue_full"
    route = httpx.get(f"{url}/v1/nothing-here", headers=auth)
    assert route.status_code == 404 and set(route.json()["error"]) == {"message", "type", "param", "code"}
    after = scrape(url)
    counts = {code: delta(after, before, "tunesmith:request_errors_total", model_name="main", code=code)
              for code in ("400", "401", "404", "413", "422", "429")}
    assert counts == {"400": 3, "401": 2, "404": 2, "413": 1, "422": 1, "429": 1}


def test_metrics_count_the_requests_sent(server):
    url, _, _ = server
    before = scrape(url)
    replies = [client(url).chat.completions.create(model=m, messages=QUESTION, max_tokens=6, temperature=0)
               for m in ("main", "main", "second")]
    after = scrape(url)
    success = sum(delta(after, before, "tunesmith:request_success_total", model_name="main", finished_reason=r)
                  for r in ("stop", "length"))
    assert success == 2
    assert delta(after, before, "tunesmith:e2e_request_latency_seconds_count", model_name="main") == 2
    assert delta(after, before, "tunesmith:time_to_first_token_seconds_count", model_name="second") == 1
    assert delta(after, before, "tunesmith:request_queue_time_seconds_count", model_name="main") == 2
    assert delta(after, before, "tunesmith:generation_tokens_total", model_name="main") == \
        sum(r.usage.completion_tokens for r in replies[:2])
    assert delta(after, before, "tunesmith:prompt_tokens_total", model_name="second") == replies[2].usage.prompt_tokens
    assert ("tunesmith:num_requests_waiting", (("model_name", "main"),)) in after


def test_request_log_and_feedback(server, runs):
    from tunesmith.serve.requestlog import read_feedback, read_requests

    url, _, _ = server
    response = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "second", "messages": QUESTION, "max_tokens": 3})
    request_id = response.json()["id"]
    assert response.headers["x-request-id"] == request_id and request_id.startswith("chatcmpl-")
    row = next(r for r in read_requests(runs["tmp"] / "requests.sqlite") if r["id"] == request_id)
    assert (row["endpoint"], row["model"], row["status"], row["run"]) == ("chat.completions", "second", 200,
                                                                           str(runs["second"].resolve()))
    assert row["prompt"] is None and row["input_chars"] == len(QUESTION[0]["content"])  # no content without the flag
    assert row["completion_tokens"] == response.json()["usage"]["completion_tokens"] and row["e2e_s"] > 0
    auth = {"Authorization": f"Bearer {KEY}"}
    ok = httpx.post(f"{url}/v1/feedback", json={"request_id": request_id, "rating": "down", "correction": "6"},
                    headers=auth)
    assert ok.status_code == 200 and ok.json()["recorded"] is True
    assert [(f["request_id"], f["rating"], f["correction"]) for f in read_feedback(runs["tmp"] / "requests.sqlite")
            if f["request_id"] == request_id] == [(request_id, "down", "6")]
    unknown = httpx.post(f"{url}/v1/feedback", json={"request_id": "chatcmpl-none", "rating": "up"}, headers=auth)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"
    bad = httpx.post(f"{url}/v1/feedback", json={"request_id": request_id, "rating": "meh"}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    refused = [r for r in read_requests(runs["tmp"] / "requests.sqlite") if r["status"] == 401]
    assert refused and all(r["error_code"] == "invalid_api_key" for r in refused)


def test_classify_answers_the_numbers_predict_gives(runs, tmp_path):
    from tunesmith.predict import predict_texts
    from tunesmith.serve.app import create_app
    from tunesmith.serve.requestlog import RequestLog, read_requests
    from tunesmith.serve.startup import ServeConfig, load_served

    texts = ["the cat was wonderful at night", "the dog felt terrible", "a day"]
    app = create_app(load_served(ServeConfig(runs["clf"]), lambda s: None), RequestLog(tmp_path / "log.sqlite"))
    url, stop = start_server(app)
    try:
        answer = httpx.post(f"{url}/v1/classify", json={"model": "clf", "input": texts}).json()
        chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "clf", "messages": QUESTION})
        assert httpx.get(f"{url}/ready").status_code == 503  # no parity check was run here
    finally:
        stop()
    expected = predict_texts(runs["clf"], texts, top=2)
    assert [(d["label"], d["probability"]) for d in answer["data"]] == [(e["label"], e["probability"])
                                                                        for e in expected]
    assert [sorted(d["probs"].values(), reverse=True) for d in answer["data"]] == \
        [[t["probability"] for t in e["top"]] for e in expected]
    assert chat.status_code == 400 and "/v1/classify" in chat.json()["error"]["message"]
    row = read_requests(tmp_path / "log.sqlite")[0]
    assert row["endpoint"] == "classify" and row["prediction"] == [{"label": e["label"], "probability":
                                                                    e["probability"]} for e in expected]


def test_parity_names_a_template_that_differs(runs):
    import copy

    from tunesmith.generate import generate_tokens, load_run
    from tunesmith.serve.parity import check_parity, parity_prompts

    loaded = load_run(runs["main"])
    other = copy.copy(loaded)
    other.tokenizer = copy.deepcopy(loaded.tokenizer)
    other.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    prompts = parity_prompts(runs["main"])
    result = check_parity(loaded, lambda ps: [generate_tokens(other, [p], 16)[0] for p in ps], prompts, "served engine",
                          candidate=other)
    assert len(prompts) == 3 and not result.ok
    assert "chat template: the two sides build different prompt tokens" in result.describe()
    same = check_parity(loaded, lambda ps: [generate_tokens(loaded, [p], 16)[0] for p in ps], prompts, "copy")
    assert same.ok and same.describe().startswith("parity: 3/3")


def test_export_merge_checks_parity_on_the_folder_it_writes(runs, capsys):
    out = runs["tmp"] / "merged"
    assert main(["export", str(runs["main"]), "--merge", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity: 3/3 validation prompts answered with identical tokens by the merged folder" in printed
    assert (out / "model.safetensors").exists()


def test_print_vllm_writes_the_command_template_and_prompts(runs, capsys):
    from transformers import AutoTokenizer

    main_run = runs["main"]
    assert main(["serve", str(main_run), "--adapter", f"second={runs['second']}", "--print-vllm"]) == 0
    printed = capsys.readouterr().out
    script = (main_run / "serve" / "vllm.sh").read_text()
    assert printed.startswith(script)
    assert "--enable-lora" in script and f"--lora-modules main={main_run / 'adapter'}" in script
    assert f"second={runs['second'] / 'adapter'}" in script and f"--generation-config {main_run}" in script
    base = script.split("vllm serve ", 1)[1].split(" ", 1)[0]  # the base model as a folder vLLM can load
    assert (Path(base) / "config.json").is_file()
    template = AutoTokenizer.from_pretrained(main_run / "tokenizer").chat_template
    assert (main_run / "serve" / "chat_template.jinja").read_text() == template
    prompts = [json.loads(x) for x in (main_run / "serve" / "parity_prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 3 and prompts[0]["messages"][-1]["role"] == "user"


def test_a_request_past_the_timeout_is_answered_408_and_logged(server, runs):
    from tunesmith.serve.requestlog import read_requests

    url, app, _ = server
    app.state.options.timeout_s = 1e-6
    try:
        response = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "main", "messages": QUESTION, "max_tokens": 30})
    finally:
        app.state.options.timeout_s = None
    assert response.status_code == 408 and response.json()["error"]["code"] == "timeout"
    row = next(r for r in read_requests(runs["tmp"] / "requests.sqlite") if r["id"] == response.headers["x-request-id"])
    assert (row["status"], row["error_code"], row["finish_reason"]) == (408, "timeout", "timeout")
    assert row["e2e_s"] > 0 and row["prompt_tokens"] > 5


def test_score_answers_the_scores_tunesmith_score_gives(tmp_path, tiny_model_dir):
    from test_reward import make_recipe as reward_recipe

    from tunesmith.methods.reward import load_reward_model
    from tunesmith.serve.app import create_app
    from tunesmith.serve.requestlog import RequestLog
    from tunesmith.serve.startup import ServeConfig, load_served
    from tunesmith.train import train_run

    recipe = reward_recipe(tmp_path, tiny_model_dir, max_steps=2)
    train_run(recipe, echo=lambda _: None)
    replies = ["Yes, gladly: cats are nice.", "No. cats."]
    app = create_app(load_served(ServeConfig(recipe.output.dir), lambda s: None), RequestLog(tmp_path / "log.sqlite"))
    url, stop = start_server(app)
    name = Path(recipe.output.dir).name
    try:
        by_prompt = httpx.post(f"{url}/v1/score", json={"model": name, "prompt": "Tell me about cats.",
                                                        "responses": replies}).json()
        by_messages = httpx.post(f"{url}/v1/score", json={"model": name, "responses": replies, "messages": [
            {"role": "user", "content": "Tell me about cats."}]}).json()
        both = httpx.post(f"{url}/v1/score", json={"model": name, "prompt": "x", "responses": replies,
                                                   "messages": [{"role": "user", "content": "x"}]})
    finally:
        stop()
    prompt = [{"role": "user", "content": "Tell me about cats."}]
    expected = load_reward_model(recipe.output.dir).score([prompt, prompt], replies)
    assert [d["score"] for d in by_prompt["data"]] == expected == [d["score"] for d in by_messages["data"]]
    assert both.status_code == 400 and both.json()["error"]["param"] == "prompt"


def test_a_client_that_leaves_a_stream_cancels_its_request(server, runs):
    from tunesmith.serve.requestlog import read_requests

    url, _, _ = server
    body = {"model": "main", "messages": QUESTION, "max_tokens": 60, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        request_id = response.headers["x-request-id"]
        next(response.iter_lines())  # the first chunk, then hang up
    deadline = time.monotonic() + 20
    rows = []
    while time.monotonic() < deadline and not rows:
        rows = [r for r in read_requests(runs["tmp"] / "requests.sqlite") if r["id"] == request_id]
        time.sleep(0.1)
    assert rows and rows[0]["status"] == 499 and rows[0]["error_code"] == "client_closed"
    assert rows[0]["completion_tokens"] < 60


def test_serve_refuses_to_start_when_the_served_answers_differ(runs, monkeypatch, capsys):
    """The start-up check wired to the command: an engine answering other tokens stops `tunesmith serve` with
    exit 2, naming the prompt and the token where the answers part; the port is free again afterwards."""
    from tunesmith.serve import parity
    from tunesmith.serve.startup import bind

    real = parity.engine_answer

    def off_by_one(engine, loaded, max_new_tokens=parity.MAX_NEW_TOKENS, adapter=None):
        answer = real(engine, loaded, max_new_tokens, adapter)
        return lambda prompts: [ids[:2] + [ids[2] + 1] + ids[3:] for ids in answer(prompts)]

    monkeypatch.setattr(parity, "engine_answer", off_by_one)
    port = bind("127.0.0.1", 0)
    number = port.getsockname()[1]
    port.close()
    code = main(["serve", str(runs["main"]), "--port", str(number), "--log", str(runs["tmp"] / "refused.sqlite")])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert "parity: 0/3 validation prompts answered with identical tokens" in err
    assert "prompt 1: differs at token 2" in err and "--no-parity" in err
    assert not (runs["tmp"] / "refused.sqlite").exists()
    bind("127.0.0.1", number).close()


def test_content_parts_and_the_developer_role_read_as_text_and_lone_surrogates_are_refused(server):
    url, _, _ = server
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    plain = client(url).chat.completions.create(model="main", max_tokens=6, messages=[
        {"role": "system", "content": "Be brief."}, *QUESTION])
    parts = client(url).chat.completions.create(model="main", max_tokens=6, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    surrogate = httpx.post(f"{url}/v1/chat/completions", headers=auth,
                           content='{"model": "main", "messages": [{"role": "user", "content": "hi \\ud800"}]}')
    assert surrogate.status_code == 400 and "lone surrogate" in surrogate.json()["error"]["message"]
    deep = httpx.post(f"{url}/v1/chat/completions", headers=auth, content="[" * 20_000 + "]" * 20_000)
    assert deep.status_code in (400, 422) and set(deep.json()) == {"error"}


def test_monitor_parity_asks_another_server_the_runs_prompts(server, runs, capsys, monkeypatch):
    """`tunesmith monitor --parity URL`: the run's own prompts asked of a server (here tunesmith itself, as a
    stand-in for a vLLM deployment): the same answers exit 0; another model's answers exit 1 and are shown."""
    url, _, _ = server
    monkeypatch.setenv("PARITY_KEY", KEY)
    common = ["monitor", "--parity", f"{url}/v1", "--run", str(runs["main"]), "--api-key-env", "PARITY_KEY"]
    assert main([*common, "--model", "main"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"parity: 3/3 validation prompts answered the same by {url}/v1")
    assert out.count("same answer") == 3
    assert main([*common, "--model", "second"]) == 1  # another adapter of the same base answers otherwise
    out = capsys.readouterr().out
    assert "differs" in out and "    served: " in out
    assert main([*common, "--model", "nope"]) == 2
    assert "the server answered 404" in capsys.readouterr().err


def test_a_killed_server_loses_no_answered_request(runs, tmp_path):
    """`kill -9` of `tunesmith serve` under load: every request a client got an answer for is in the request log."""
    import signal
    import socket
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from tunesmith.serve.requestlog import read_requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "requests.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", str(runs["main"]), "--port", str(port),
                             "--no-parity", "--log", str(log), "--max-batch", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        answered: list[str] = []

        def ask(i: int) -> None:
            try:
                out = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30) \
                    .chat.completions.create(model="main", max_tokens=8,
                                             messages=[{"role": "user", "content": f"What is {i} plus {i}?"}])
                answered.append(out.id)
            except openai.OpenAIError:
                pass  # cut off by the kill: never answered

        with ThreadPoolExecutor(8) as pool:
            for i in range(200):
                pool.submit(ask, i)
            while len(answered) < 12 and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert len(answered) >= 12
    logged = {row["id"] for row in read_requests(log)}
    assert set(answered) <= logged, sorted(set(answered) - logged)
