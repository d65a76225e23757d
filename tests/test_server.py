"""OpenAI-compatible server: the official openai client, malformed requests, disconnects, a small load run."""
import asyncio
import json
import os
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import kangaroo_rt as K  # noqa: E402
from bench_loader import load_benchmark  # noqa: E402
from kangaroo_rt.embedded import ASSETS  # noqa: E402
from kangaroo_rt.server import EngineRunner, create_app, load_engine  # noqa: E402

NAME = "test-model"


bench_server = load_benchmark("bench_server")
EMBEDDED = os.path.isfile(os.path.join(ASSETS, "adapter", "kangaroo.json"))


class _Server:
    """uvicorn in a background thread on a free 127.0.0.1 port."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tok = engine, tokenizer
        self.runner = EngineRunner(engine)
        self.runner.start()
        config = uvicorn.Config(create_app(self.runner, tokenizer, NAME), host="127.0.0.1", port=0,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def metrics(self):
        return bench_server.parse_metrics(httpx.get(f"{self.url}/metrics").text)

    def wait_idle(self, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = self.metrics()
            if m["kangaroo_rt_requests_running"] == 0 and m["kangaroo_rt_requests_waiting"] == 0:
                return m
            time.sleep(0.05)
        raise AssertionError(f"slots still busy: {self.metrics()}")

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.runner.stop()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return bench_server.write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    engine, tok = load_engine(tiny_dir["model"], tiny_dir["adapter"], exit_layer=2, gamma=4, eta=0.5,
                              max_batch=4, max_len=1024)
    server = _Server(engine, tok)
    yield server
    server.close()


@pytest.fixture(scope="module")
def embedded():
    if not EMBEDDED:
        pytest.skip("the embedded model's assets are absent (being trained); the tiny model covers the server")
    engine, tok = load_engine(None, max_batch=4, max_len=512)
    server = _Server(engine, tok)
    yield server
    server.close()


def _alone(engine, ids, max_new):
    """Greedy tokens of the engine's model on ``ids`` alone through generate()."""
    model = K.KangarooModel(engine.target, engine.decoder.adapter, exit_layer=engine.decoder.exit_layer,
                            kangaroo=engine.kangaroo)
    eos = sorted(engine._eos_ids) or None
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, eos_token_id=eos)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_openai_client_completions_chat_and_streams(which, request):
    srv = request.getfixturevalue(which)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [NAME]
    prompt = "def add(a, b):\n"
    c = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    ids = srv.tok(prompt).input_ids
    ref = _alone(srv.engine, ids, 12)
    assert c.choices[0].text == srv.tok.decode(ref, skip_special_tokens=True)
    assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == len(ref)
    assert c.choices[0].finish_reason == ("length" if len(ref) == 12 else "stop")

    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == c.choices[0].text and len(chunks) >= 2
    assert chunks[-1].usage.completion_tokens == len(ref)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.choices[0].finish_reason

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    if srv.tok.chat_template is None:  # the server says so instead of guessing a template
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model=NAME, messages=messages, max_tokens=10)
    else:
        chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
        assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
        streamed = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                                       temperature=0, stream=True))
        assert streamed[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == chat.choices[0].message.content
        assert streamed[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    kw = dict(model=NAME, prompt=prompt, max_tokens=10, temperature=0.9, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text

    batch = client.completions.create(model=NAME, prompt=[prompt, "import os\n"], max_tokens=6, temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1] and batch.choices[0].text == srv.tok.decode(
        ref[:6], skip_special_tokens=True)
    srv.wait_idle()


def test_stop_strings_cut_the_text_and_free_the_slot(tiny):
    client = openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="none", max_retries=0, timeout=60)
    prompt = "for i in range(10):\n"
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
    stop = full[10:13]
    assert len(stop) == 3 and full.find(stop) >= 0
    before = tiny.metrics()["kangaroo_rt_requests_aborted_total"]
    # Room for many more tokens than the stop string needs: with 40 the engine could finish the request before the
    # server's abort at the stop string arrives (a fast engine on this tiny model), and nothing would count as aborted.
    cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=600, temperature=0, stop=[stop, "@@@@"])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=600, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text
    m = tiny.wait_idle()
    assert m["kangaroo_rt_requests_aborted_total"] >= before + 1  # the engine request ended at the stop string


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", "invalid request"),
    ("/v1/completions", b"[1, 2, 3]", "invalid request"),
    ("/v1/completions", {"model": NAME}, "prompt"),
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/completions", {"model": "other", "prompt": "hi"}, "does not exist"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "n": 2}, "n=2"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 3}, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "echo": True}, "echo"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, "empty"),
    ("/v1/completions", {"model": NAME, "prompt": [5, 10 ** 6]}, "outside the vocabulary"),
    ("/v1/completions", {"model": NAME, "prompt": [1] * 1100}, "fits prompts of at most"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 100000}, "at most"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "seed": "x"}, "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stream": True, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, "content"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ("/v1/nothing", {}, "Not Found"),
]


def test_malformed_requests_get_4xx_json_errors(tiny):
    with httpx.Client(base_url=tiny.url, timeout=30) as http:
        for path, body, needle in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = http.post(path, json=body)
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            err = r.json()["error"]
            assert needle in err["message"] or needle == err.get("param"), (body, err)
            assert err["type"]
        r = http.get("/v1/completions")
        assert r.status_code == 405 and r.json()["error"]["message"]
        assert http.get("/health").json() == {"status": "ok"}
    client = openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|fits prompts"):
        client.completions.create(model=NAME, prompt=[1] * 1100, max_tokens=5)
    m = tiny.metrics()
    assert m['kangaroo_rt_http_requests_total{route="/v1/completions",status="400"}'] >= 15
    tiny.wait_idle()


def test_client_disconnect_frees_the_slot(tiny, monkeypatch):
    # Each engine step is held back a little, so that 1000 tokens take seconds on any host: on a fast one the tiny
    # model finished them before the server could notice the non-streaming client below had left (flaky).
    step = tiny.engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(tiny.engine, "step", slow_step)
    before = tiny.metrics()
    body = {"model": NAME, "prompt": "import os\n", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=tiny.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert tiny.metrics()["kangaroo_rt_requests_running"] == 1
        # leaving the block closes the connection mid-stream
    m = tiny.wait_idle()
    assert m["kangaroo_rt_requests_aborted_total"] == before["kangaroo_rt_requests_aborted_total"] + 1
    produced = m["kangaroo_rt_generation_tokens_total"] - before["kangaroo_rt_generation_tokens_total"]
    assert produced < 1000
    # a non-streaming client that gives up: the server notices within ~0.25 s and aborts
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{tiny.url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
    m2 = tiny.wait_idle()
    assert m2["kangaroo_rt_requests_aborted_total"] == m["kangaroo_rt_requests_aborted_total"] + 1


def test_runner_serves_submissions_and_metrics_between_steps(tiny_dir):
    """Another thread's metrics and submissions are served between two steps: each waits about one step, and
    the engine steps between any two of them. CPython's locks are not fair: with a lock the engine thread took
    back after every step, either side could hold it for seconds (the server's /metrics once waited for a
    whole request to finish), or a caller in a loop could keep the engine from stepping."""
    engine, _ = load_engine(tiny_dir["model"], tiny_dir["adapter"], exit_layer=2, gamma=4, eta=0.5,
                            max_batch=4, max_len=1024)
    step = engine.step

    def slow_step():
        time.sleep(0.01)
        return step()

    engine.step = slow_step  # 1000 tokens now take seconds
    runner = EngineRunner(engine)
    runner.start()
    loop = asyncio.new_event_loop()
    try:
        runner.submit([5, 6, 7], K.RequestParams(max_new_tokens=1000), loop)
        waits, seen = [], []

        def probe():
            for _ in range(20):
                t = time.perf_counter()
                seen.append(runner.metrics())
                waits.append(time.perf_counter() - t)
            t = time.perf_counter()
            runner.submit([8, 9], K.RequestParams(max_new_tokens=4), loop)
            waits.append(time.perf_counter() - t)
            seen.append(runner.metrics())

        th = threading.Thread(target=probe)
        th.start()
        th.join(timeout=60)
        assert not th.is_alive()
        assert max(waits) < 0.5, waits  # a step is ~10 ms; the long request lasts seconds
        steps = [m["steps_total"] for m in seen]
        assert all(a < b for a, b in zip(steps, steps[1:])), steps
        assert [m["requests_running"] for m in seen] == [1] * 20 + [2]
    finally:
        runner.stop()
        loop.close()
    with pytest.raises(RuntimeError, match="not running"):
        runner.submit([5], K.RequestParams(max_new_tokens=2), loop)
    assert runner.metrics()["requests_added_total"] == 2  # read in the caller once the thread has stopped


def test_health_and_prometheus_metrics(tiny):
    assert httpx.get(f"{tiny.url}/health").json() == {"status": "ok"}
    r = httpx.get(f"{tiny.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "# TYPE kangaroo_rt_requests_running gauge" in r.text
    m = bench_server.parse_metrics(r.text)
    assert m["kangaroo_rt_slots"] == 4 and m["kangaroo_rt_generation_tokens_total"] > 0
    assert m["kangaroo_rt_mean_accepted_tokens"] > 1.0 and 'kangaroo_rt_draft_acceptance_rate{position="1"}' in m


def test_bench_server_small_load_through_the_cli(tmp_path):
    """kangaroo-rt serve --model/--adapter in a subprocess, 4 clients x 2 requests, twice: no errors, slots freed."""
    out = tmp_path / "bench_server.json"  # --out names a folder, as gpu_suite.sh passes it
    res = bench_server.main(["--tiny", "--clients", "4", "--requests", "2", "--rounds", "2", "--max-tokens", "16",
                             "--max-batch", "3", "--threads", "1", "--out", str(tmp_path)])
    assert all(r["errors"] == 0 and r["ok"] == 8 for r in res["rounds"])
    assert res["server_metrics"]["kangaroo_rt_requests_running"] == 0
    # 1 chat-support probe + 2 warm-up requests + 2 rounds x 8
    assert res["server_metrics"]["kangaroo_rt_requests_finished_total"] == 1 + 2 + 16
    assert res["endpoints"] == "completions and chat"
    assert res["rounds"][0]["latency_s"]["p50"] > 0 and res["rss_mib"]["after_rounds"][1] is not None
    assert json.loads(out.read_text())["clients"] == 4


def test_bench_server_sampled_load(tmp_path):
    """--temperature / --top-p: every request sampled with its index as its seed, through the engine's sampled
    rounds; the JSON records the settings."""
    assert bench_server.sampling_kwargs(0.0, 0.9, 3) == {"temperature": 0}
    assert bench_server.sampling_kwargs(0.8, None, 3) == {"temperature": 0.8, "seed": 3}
    res = bench_server.main(["--tiny", "--clients", "3", "--requests", "2", "--rounds", "1", "--max-tokens", "16",
                             "--max-batch", "3", "--threads", "1", "--temperature", "0.8", "--top-p", "0.9",
                             "--out", str(tmp_path)])
    assert all(r["errors"] == 0 and r["ok"] == 6 for r in res["rounds"])
    assert (res["temperature"], res["top_p"]) == (0.8, 0.9)
    assert res["server_metrics"]["kangaroo_rt_requests_running"] == 0
