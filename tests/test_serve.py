"""`tunesmith serve`: the OpenAI-compatible server, driven by the real `openai` client over HTTP
against a tiny model with two LoRA adapters; and `tunesmith chat`."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from conftest import UvicornThread  # noqa: E402
from tunesmith.errors import ConfigError  # noqa: E402
from tunesmith.serving import Limits, build_app  # noqa: E402
from tunesmith.serving.engine import Engine, Job, QueueFull  # noqa: E402
from tunesmith.serving.text import TextStream  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPT = [{"role": "user", "content": "what is the capital of france"}]


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("serve") / "base"
    shutil.copytree(tiny_model_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def _adapter(base_dir, folder, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(base_dir):
    root = base_dir.parent
    return {"alpha": _adapter(base_dir, root / "alpha", 1), "beta": _adapter(base_dir, root / "beta", 2)}


class Running(UvicornThread):
    def client(self, key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def server(base_dir, adapters):
    running = Running(build_app(str(base_dir), adapters=adapters, name="base",
                                limits=Limits(max_tokens=64, max_request_bytes=20_000)))
    yield running
    running.stop()


def _greedy(model, tok, messages, max_new_tokens=12):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]


def test_models_chat_and_completion_match_transformers_generate(server, base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = server.client()
    assert [m.id for m in client.models.list()] == ["base", "alpha", "beta"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    expected, prompt_len = _greedy(model, tok, PROMPT)
    r = client.chat.completions.create(model="base", messages=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == prompt_len and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    c = client.completions.create(model="base", prompt="the sky is", max_tokens=6, temperature=0)
    ids = tok("the sky is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert c.choices[0].text == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_stop_sequences_and_streaming(server):
    client = server.client()
    full = client.completions.create(model="base", prompt="the sky is", max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason in ("length", "stop")
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.completions.create(model="base", prompt="the sky is", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"

    plain = client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_two_adapters_answer_differently_and_as_peft_does(server, base_dir, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = server.client()
    answers = {m: client.chat.completions.create(model=m, messages=PROMPT, max_tokens=12, temperature=0)
               .choices[0].message.content for m in ("base", "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers
    tok = AutoTokenizer.from_pretrained(base_dir)
    alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapters["beta"]).eval()
    assert answers["beta"] == _greedy(alone, tok, PROMPT)[0]


def test_concurrent_requests_are_batched_and_answer_as_alone(server):
    client = server.client()
    models = ["base", "alpha", "beta", "alpha"] * 3
    alone = {m: client.chat.completions.create(model=m, messages=PROMPT, max_tokens=10, temperature=0)
             .choices[0].message.content for m in set(models)}
    before = _http(server.url + "/health").json()["batches"]
    with ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(lambda m: client.chat.completions.create(
            model=m, messages=PROMPT, max_tokens=10, temperature=0).choices[0].message.content, models))
    assert results == [alone[m] for m in models]
    health = _http(server.url + "/health").json()
    assert health["largest_batch"] > 1 and health["batches"] - before < len(models)


def test_seeded_sampling_repeats(server):
    client = server.client()
    runs = [client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=12, temperature=1.0,
                                           top_p=0.9, seed=7).choices[0].message.content for _ in range(2)]
    assert runs[0] == runs[1]
    many = client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=1)
    assert [c.index for c in many.choices] == [0, 1, 2]
    one = client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=2)
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # one prompt, counted once (as OpenAI does)
    two = client.completions.create(model="alpha", prompt=["the sky", "the sea is"], max_tokens=2, n=2)
    singles = [client.completions.create(model="alpha", prompt=p, max_tokens=2).usage.prompt_tokens
               for p in ("the sky", "the sea is")]
    assert len(two.choices) == 4 and two.usage.prompt_tokens == sum(singles)


def test_without_max_tokens_the_answer_gets_what_the_context_leaves(server, base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)

    def length(n):
        text = tok.apply_chat_template([{"role": "user", "content": "word " * n}], tokenize=False,
                                       add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    n = max(k for k in range(1, 300) if length(k) <= 250)  # the test server's context is 256 tokens
    messages = [{"role": "user", "content": "word " * n}]
    r = server.client().chat.completions.create(model="base", messages=messages, temperature=0)
    assert r.usage.prompt_tokens == length(n) and 1 <= r.usage.completion_tokens <= 256 - length(n)
    full = next(k for k in range(n, 400) if length(k) >= 256)
    refused = _post(server, "/v1/chat/completions",
                    json.dumps({"model": "base", "messages": [{"role": "user", "content": "word " * full}]}), raw=True)
    assert refused.status_code == 400 and "leaves no room for an answer" in refused.json()["error"]["message"]


class Reply:
    def __init__(self, status, text):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def _http(url, data=None, headers=None):
    """A raw request (bodies the openai client would never send), answered whatever the status."""
    request = urllib.request.Request(url, data=None if data is None else data.encode(), headers=headers or {},
                                     method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return Reply(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read().decode())


def _post(server, path, body, raw=False):
    data = body if raw else json.dumps(body)
    return _http(server.url + path, data, {"content-type": "application/json"})


@pytest.mark.parametrize("body, status, words", [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "must be a JSON object"),
    ({"model": "base"}, 400, "messages: Field required"),
    ({"model": "base", "messages": []}, 400, "messages"),
    ({"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "base", "messages": PROMPT, "temperature": 5}, 400, "temperature"),
    ({"model": "base", "messages": PROMPT, "max_tokens": 1000}, 400, "above this server's limit of 64"),
    ({"model": "base", "messages": PROMPT, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "nope", "messages": PROMPT}, 404, "model 'nope' does not exist"),
    ({"model": "base", "messages": PROMPT, "logprobs": True}, 400, "logprobs is not supported"),
    ({"model": "base", "messages": PROMPT, "tools": [{"type": "function"}]}, 400, "tools is not supported"),
    ({"model": "base", "messages": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"model": "base", "messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 64}, 400,
     "context is 256 tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": "x" * 30_000}]}, 413, "limit is 20000"),
])
def test_bad_chat_requests_get_openai_shaped_4xx(server, body, status, words):
    r = _post(server, "/v1/chat/completions", body if isinstance(body, str) else json.dumps(body), raw=True)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"]


def test_bad_requests_leave_the_server_serving(server):
    assert _post(server, "/v1/completions", {"model": "base", "prompt": "x", "echo": True}).status_code == 400
    assert _post(server, "/v1/completions", {"model": "base", "prompt": []}).status_code == 400
    empty = _post(server, "/v1/completions", {"model": "base", "prompt": ""})  # no BOS in this tokenizer
    assert empty.status_code == 400 and "empty prompt" in empty.json()["error"]["message"]
    missing = _http(server.url + "/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()
    assert _http(server.url + "/health").json()["status"] == "ok"
    r = server.client().completions.create(model="base", prompt="the", max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_api_key_queue_limit_and_lazy_adapters(base_dir, adapters):
    app = build_app(str(base_dir), adapters={"alpha": adapters["alpha"]}, api_key="s3cret", lazy=True,
                    limits=Limits(max_queue=2))
    running = Running(app)
    try:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            running.client("wrong").models.list()
        assert _http(running.url + "/v1/models").status_code == 401
        client = running.client("s3cret")
        served = app.state.served
        assert served.loaded == set()
        client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=3)
        assert served.loaded == {"alpha"}
        with pytest.raises(openai.RateLimitError, match="waiting"):
            client.completions.create(model="base", prompt="the", max_tokens=2, n=3)
    finally:
        running.stop()


def test_engine_refuses_past_its_queue_and_survives_a_failing_batch(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    engine = Engine(AutoModelForCausalLM.from_pretrained(base_dir), tok, max_queue=2)
    try:
        with pytest.raises(QueueFull):
            engine.submit([Job([5], 2, lambda e: None) for _ in range(3)])
        events = []
        done = threading.Event()

        def emit(ev):
            events.append(ev)
            if ev.kind != "text":
                done.set()
        engine.submit([Job([10 ** 6], 2, emit)])  # an id past the vocabulary: the forward fails
        assert done.wait(30) and events[-1].kind == "error" and "generation failed" in events[-1].text
        done.clear()
        engine.submit([Job(tok("the sky")["input_ids"], 2, emit)])
        assert done.wait(30) and events[-1].kind == "done"
    finally:
        engine.close()


def test_an_adapter_that_fails_to_load_fails_only_its_own_requests(base_dir):
    """--lazy: an adapter that cannot be attached fails the requests for it, not the base-model request
    that shares its batch (nor one that joins a running batch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()

    def load(name):
        if name == "broken":
            raise ValueError("adapter 'broken' does not fit this model")
        return model
    engine = Engine(model, tok, load_adapter=load)
    events, done = {}, threading.Event()

    def job(name, adapter):
        def emit(ev):
            if ev.kind != "text":
                events[name] = ev
                if len(events) == 3:
                    done.set()
        return Job(tok("the sky")["input_ids"], 4, emit, adapter=adapter, temperature=0)
    try:
        engine.submit([job("base", "__base__"), job("broken", "broken"), job("again", "broken")])
        assert done.wait(60)
        assert events["base"].kind == "done"
        assert events["broken"].kind == events["again"].kind == "error"
        assert "does not fit this model" in events["broken"].text
    finally:
        engine.close()


def test_a_request_joins_a_running_batch_and_answers_as_alone(base_dir):
    """Step-level batching: a request arriving mid-generation joins the running batch at the next step
    (one batch, two rows), finishes long before the first, and both answer as they do alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    engine = Engine(AutoModelForCausalLM.from_pretrained(base_dir).eval(), tok, max_batch_size=4)
    long_ids, short_ids = tok("the sky")["input_ids"], tok("what is the capital of france and why")["input_ids"]
    assert len(short_ids) > len(long_ids)  # the newcomer is longer: the running row's cache gets left-padded
    texts, done, all_done = {}, {}, threading.Event()

    def job(name, ids, max_tokens, on_text=lambda: None):
        def emit(ev):
            if ev.kind == "text":
                texts[name] = texts.get(name, "") + ev.text
                on_text()
            else:
                assert ev.kind == "done", ev.text
                done[name] = time.perf_counter()
                if len(done) == expected[0]:
                    all_done.set()
        return Job(ids, max_tokens, emit, temperature=0)

    def generate(first, then=None):
        texts.clear(), done.clear(), all_done.clear()
        expected[0] = 1 + (then is not None)
        sent = []

        def join_now():  # runs on the worker thread, mid-batch: the newcomer waits at most one step
            if then is not None and not sent:
                sent.append(engine.submit([then()]))
        engine.submit([first(join_now)])
        assert all_done.wait(60)
        return dict(texts), dict(done)

    expected = [1]
    try:
        alone = {**generate(lambda _: job("long", long_ids, 48))[0],
                 **generate(lambda _: job("short", short_ids, 6))[0]}
        before = engine.batches
        texts_now, done_at = generate(lambda hook: job("long", long_ids, 48, hook), lambda: job("short", short_ids, 6))
        assert engine.batches - before == 1 and engine.largest_batch == 2
        assert done_at["short"] < done_at["long"]
        assert texts_now == alone
    finally:
        engine.close()


def test_text_stream_holds_partial_stops_and_characters(tiny_tokenizer):
    ids = tiny_tokenizer("the sky is blue and the sea", add_special_tokens=False)["input_ids"]
    stream = TextStream(tiny_tokenizer, ["blue and"])
    out = ""
    for i in ids:
        out += stream.push(i)
        if stream.stopped:
            break
    assert stream.stopped and out == "the sky is "
    # one token completing two stops: the earlier in the text wins, whatever the order of the list
    for stops in (["sea", "sky"], ["sky", "sea"]):
        stream = TextStream(tiny_tokenizer, stops)
        stream.ids = ids[:-1]
        stream.sent = 0
        assert stream.push(ids[-1]) == "the " and stream.stopped
    whole = TextStream(tiny_tokenizer, [])
    text = "".join(whole.push(i) for i in ids) + whole.flush()
    assert text == "the sky is blue and the sea"


def test_refusals_before_loading(base_dir, adapters, tmp_path, tiny_bert_dir):
    from tunesmith.serving.models import load_served, parse_adapters

    with pytest.raises(ConfigError, match="is not NAME=PATH"):
        parse_adapters(["alpha"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_adapters(["a=x", "a=y"])
    with pytest.raises(ConfigError, match="not found"):
        load_served(str(base_dir), {"x": tmp_path / "missing"})
    other = tmp_path / "other"
    shutil.copytree(base_dir, other)
    with pytest.raises(ConfigError, match="trained on '.*base', but the served model is"):
        load_served(str(other), {"alpha": adapters["alpha"]})
    with pytest.raises(ConfigError, match="is the base model's name"):
        load_served(str(base_dir), {"base": adapters["alpha"]}, name="base")
    with pytest.raises(ConfigError, match="only text generators|decoder-only"):
        load_served(str(tiny_bert_dir))
    with pytest.raises(ConfigError, match="'fp8' is not one of"):
        load_served(str(base_dir), dtype="fp8")


def test_chat_loop_streams_keeps_history_and_resets(base_dir, adapters):
    from tunesmith.serving.chat import chat_loop
    from tunesmith.serving.models import load_served

    served = load_served(str(base_dir), {"alpha": adapters["alpha"]})
    lines = iter(["what is the capital of france", "and the sky", "/reset", "/system be brief", "hello", "/bogus"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    out = []
    history = chat_loop(served, max_tokens=5, temperature=0, read=read, write=out.append, adapter="alpha")
    text = "".join(out)
    assert "chatting with alpha" in text and "(conversation reset)" in text and "unknown command /bogus" in text
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "hello"
    assert "[cut at max tokens]" in text or history[1]["content"] in text


def test_cli_serve_and_chat_refuse_bad_input(base_dir, tmp_path):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["serve", str(base_dir), "--adapter", "broken"])
    assert r.exit_code == 2 and "is not NAME=PATH" in r.output
    r = runner.invoke(app, ["chat", str(base_dir), "--adapter", str(tmp_path / "none")])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["chat", str(base_dir), "--max-tokens", "4", "--temperature", "0"], input="hi\n/exit\n")
    assert r.exit_code == 0 and "chatting with base" in r.output


def test_mutated_requests_never_get_a_500(server):
    """Seeded structure mutations of valid bodies: every answer is a 2xx or an OpenAI-shaped 4xx."""
    import random

    rng = random.Random(0)
    valid = [("/v1/chat/completions", {"model": "base", "messages": PROMPT, "max_tokens": 2}),
             ("/v1/completions", {"model": "alpha", "prompt": "the sky", "max_tokens": 2})]
    junk = [None, -1, 0, 1e308, "", "x" * 50, [], {}, [None], {"a": 1}, True, [[["deep"]]], "\u0000\ud7ff"]
    for _ in range(40):
        path, body = rng.choice(valid)
        body = json.loads(json.dumps(body))
        key = rng.choice([*body, "messages", "stop", "n", "seed", "top_p", "stream", "temperature"])
        if key == "messages" and "messages" in body and rng.random() < 0.5:
            body["messages"] = [{**PROMPT[0], rng.choice(["role", "content"]): rng.choice(junk)}]
        else:
            body[key] = rng.choice(junk)
        r = _post(server, path, body)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
    assert _http(server.url + "/health").json()["status"] == "ok"


def test_server_answers_while_it_generates(server):
    client = server.client()
    worker = threading.Thread(target=lambda: client.chat.completions.create(
        model="beta", messages=PROMPT, max_tokens=64, temperature=1.0, stop=None))
    worker.start()
    try:
        deadline = time.time() + 20
        while _http(server.url + "/health").json()["generating"] == 0:
            assert time.time() < deadline and worker.is_alive(), "generation never started"
            time.sleep(0.005)
        t = time.perf_counter()
        health = _http(server.url + "/health").json()
        assert [m.id for m in client.models.list()] == ["base", "alpha", "beta"]
        assert time.perf_counter() - t < 2.0 and health["status"] == "ok"
    finally:
        worker.join(60)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_a_qlora_run_answers_with_its_adapter(run_config):
    """A QLoRA run stays a peft model on its 4-bit base (nothing to merge into): its own adapter must
    answer for the served name, not peft's 'no adapter' (which is the plain base model)."""
    import tunesmith

    cfg = run_config(method={"type": "qlora", "bits": 4, "compute_dtype": "fp32", "r": 4, "alpha": 32},
                     training={"max_steps": 4, "learning_rate": 5e-2})
    run = tunesmith.train(cfg, echo=lambda m: None).run_dir
    app = build_app(str(run), name="tuned")
    model, tok = app.state.served.model, app.state.served.tokenizer
    ids = tok("what is the capital of france", return_tensors="pt")["input_ids"]

    def greedy():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    with torch.no_grad():
        tuned = greedy()
        with model.disable_adapter():
            base = greedy()
    assert tuned != base  # the adapter changes the answer, so the check below tells them apart
    running = Running(app)
    try:
        got = running.client().completions.create(model="tuned", prompt="what is the capital of france",
                                                  max_tokens=8, temperature=0)
        assert got.choices[0].text == tuned
    finally:
        running.stop()


def test_a_prompt_tuning_run_is_refused_with_the_reason(run_config):
    import tunesmith
    from tunesmith.serving.models import load_served

    run = tunesmith.train(run_config(method={"type": "prompt_tuning"}, training={"max_steps": 1}),
                          echo=lambda m: None).run_dir
    with pytest.raises(ConfigError, match="PROMPT_TUNING run .*virtual tokens"):
        load_served(str(run))
