"""`qwen3vl serve` against the official `openai` client: a live server on 127.0.0.1 (random port, a
background thread) over the tiny engine, compared with Pipeline.generate on the same engine."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# The server's extra and the clients are in the test extra: a missing one must fail, not skip.
import httpx
import openai
import pytest

from conftest import random_image

KEY = "test-key"
PROMPT = "Describe the picture in detail."


class LiveServer:
    def __init__(self, pipeline, **config):
        import uvicorn

        from serve import ServerConfig, create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(pipeline, ServerConfig(**config))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.batcher().close()


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    from runtime import Pipeline

    return Pipeline.load(tiny_engine("gqa2-tied"), backend="ort", threads=1)


@pytest.fixture(scope="module")
def server(pipe):
    live = LiveServer(pipe, api_key=KEY, max_batch=4, max_queue=4, batch_window_s=0.3)
    yield live
    live.stop()


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_chat(image, text=PROMPT):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": text}]}]


def runtime_chat(image, text=PROMPT):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_greedy_answer_and_usage_equal_pipeline_generate(server, pipe):
    expected = pipe.generate([{"role": "user", "content": PROMPT}], max_new_tokens=12, do_sample=False)
    reply = server.client().chat.completions.create(model="qwen3vl", messages=[{"role": "user", "content": PROMPT}],
                                                    max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert set(reply.model_extra["timings"]) >= {"ttft_ms", "prefill_ms", "backend"}


def test_image_data_url_streamed_equals_pipeline_generate(server, pipe):
    image = random_image(48, 64, seed=3)
    expected = pipe.generate(runtime_chat(image), max_new_tokens=10, do_sample=False)
    chunks = list(server.client().chat.completions.create(
        model="qwen3vl", messages=image_chat(image), max_tokens=10, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    # The raw stream ends with OpenAI's terminator.
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": image_chat(image), "max_tokens": 3, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_stop_strings_and_logprobs(server, pipe):
    expected = pipe.generate([{"role": "user", "content": PROMPT}], max_new_tokens=12, do_sample=False, logprobs=2)
    stop = expected.text[len(expected.text) // 2:][:3]
    assert stop.strip(), expected.text
    client = server.client()
    reply = client.chat.completions.create(model="qwen3vl", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=12, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == expected.text[:expected.text.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(model="qwen3vl", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    bare = client.chat.completions.create(model="qwen3vl", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=2, temperature=0, logprobs=True)
    assert [i.logprob for i in bare.choices[0].logprobs.content] == pytest.approx(
        [a[0]["logprob"] for a in expected.logprobs[:2]], abs=1e-5)
    assert bare.choices[0].logprobs.content[0].top_logprobs == []
    for item, alternatives in zip(content, expected.logprobs):
        assert item.logprob == pytest.approx(alternatives[0]["logprob"], abs=1e-5)  # greedy: the top token
        assert [a.logprob for a in item.top_logprobs] == pytest.approx([a["logprob"] for a in alternatives], abs=1e-5)


def test_concurrent_clients_are_batched_and_get_their_solo_answers(server, pipe):
    images = [random_image(32 + 16 * i, 48, seed=10 + i) for i in range(3)]
    prompts = ["What is this?", "Describe it.", "Say something about the colors."]
    solo = [pipe.generate(runtime_chat(im, p), max_new_tokens=8 + i, do_sample=False)
            for i, (im, p) in enumerate(zip(images, prompts))]
    seeded = dict(temperature=0.9, top_p=0.95, seed=1234)
    solo_sampled = server.client().chat.completions.create(
        model="qwen3vl", messages=[{"role": "user", "content": "Tell a story."}], max_tokens=10, **seeded)
    assert solo_sampled.model_extra["timings"]["batch_rows"] == 1
    direct = pipe.generate([{"role": "user", "content": "Tell a story."}], max_new_tokens=10, do_sample=True,
                           **seeded)
    assert solo_sampled.choices[0].message.content == direct.text

    def greedy(i):
        return server.client().chat.completions.create(model="qwen3vl", messages=image_chat(images[i], prompts[i]),
                                                       max_tokens=8 + i, temperature=0)

    def sampled():
        return server.client().chat.completions.create(
            model="qwen3vl", messages=[{"role": "user", "content": "Tell a story."}], max_tokens=10, **seeded)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(greedy, i) for i in range(3)] + [pool.submit(sampled)]
        replies = [f.result() for f in futures]
    assert max(r.model_extra["timings"]["batch_rows"] for r in replies) > 1  # they did share a batch
    for reply, expected in zip(replies, solo):
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.completion_tokens == len(expected.token_ids)
    assert replies[3].choices[0].message.content == solo_sampled.choices[0].message.content


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list()] == ["qwen3vl"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("qwen3vl_requests_total", "qwen3vl_queue_depth", "qwen3vl_tokens_per_second",
                 "qwen3vl_time_to_first_token_seconds_sum", "qwen3vl_errors_total"):
        assert name in text


def test_a_follow_up_reports_its_cached_prompt_tokens_in_usage_and_metrics(server, pipe):
    image = random_image(64, 64, seed=11)
    first_chat = image_chat(image, "What is in this picture? Answer briefly.")
    client = server.client()
    first = client.chat.completions.create(model="qwen3vl", messages=first_chat, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    chat = first_chat + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And the colours?"}]
    expected = pipe.generate(runtime_chat(image, "What is in this picture? Answer briefly.")
                             + chat[1:], max_new_tokens=6, do_sample=False)  # the server's entry is reused here too
    chunks = list(client.chat.completions.create(model="qwen3vl", messages=chat, max_tokens=6, temperature=0,
                                                 stream=True))
    cached = chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 1 <= cached < chunks[-1].usage.prompt_tokens
    assert expected.cached_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    metrics = httpx.get(server.url + "/metrics").text
    hits = [line for line in metrics.splitlines()
            if line.startswith('qwen3vl_prefix_cache_lookups_total{input="image",result="hit"}')]
    assert hits and int(hits[0].split()[-1]) >= 2
    assert "qwen3vl_image_feature_cache_lookups_total" in metrics and "qwen3vl_prefix_cache_bytes" in metrics


@pytest.mark.parametrize("case, status, fragment", [
    ("wrong key", 401, "API key"),
    ("n=2", 400, "n=1"),
    ("temperature", 400, "temperature"),
    ("not an image", 400, "image"),
    ("remote url", 400, "--allow-remote-images"),
    ("local path", 400, "local image paths"),
    ("bad part", 400, "unsupported content part"),
    ("over context", 413, "context"),
    ("image too large", 413, "limit"),
])
def test_errors_are_openai_style_with_their_status(server, case, status, fragment):
    client = server.client("wrong" if case == "wrong key" else KEY)
    messages = [{"role": "user", "content": "Hi"}]
    extra = {}
    if case == "n=2":
        extra["n"] = 2
    elif case == "temperature":
        extra["temperature"] = 7
    elif case == "not an image":
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()}}]}]
    elif case == "remote url":
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]
    elif case == "local path":
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]
    elif case == "bad part":
        messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    elif case == "over context":
        messages = [{"role": "user", "content": "word " * 9000}]
    elif case == "image too large":
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + "A" * (15 * 1024 * 1024)}}]}]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="qwen3vl", messages=messages, max_tokens=2, **extra)
    assert info.value.status_code == status
    with pytest.raises(openai.APIStatusError) as streamed:  # the same status when streaming
        client.chat.completions.create(model="qwen3vl", messages=messages, max_tokens=2, stream=True, **extra)
    assert streamed.value.status_code == status
    body = info.value.response.json()
    assert fragment in body["error"]["message"] and "Traceback" not in info.value.response.text
    # the server keeps serving
    assert server.client().chat.completions.create(model="qwen3vl", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=1, temperature=0).choices[0].message.content is not None


def test_full_queue_answers_429_with_retry_after(pipe):
    live = LiveServer(pipe, max_batch=1, max_queue=1, batch_window_s=0.0)
    try:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60),
                                    range(6)))
        statuses = sorted(r.status_code for r in replies)
        assert 200 in statuses and 429 in statuses, statuses
        refused = next(r for r in replies if r.status_code == 429)
        assert refused.headers["Retry-After"] and refused.json()["error"]["code"] == "queue_full"
        assert 'qwen3vl_errors_total{kind="queue_full"}' in httpx.get(live.url + "/metrics").text
    finally:
        live.stop()


def test_client_disconnect_cancels_its_generation(pipe):
    live = LiveServer(pipe, max_batch=1, max_queue=4, batch_window_s=0.0)
    try:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 200, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    break  # one chunk read; closing the connection is the disconnect
        assert_disconnect_dropped(live)
    finally:
        live.stop()


def assert_disconnect_dropped(live) -> None:
    """The worker notices the hang-up at its next step: the row is dropped and the disconnect counted."""
    for _ in range(100):
        if 'kind="client_disconnected"' in httpx.get(live.url + "/metrics").text and \
                live.app.state.batcher().running == 0:
            break
        time.sleep(0.05)
    assert live.app.state.batcher().running == 0
    assert 'kind="client_disconnected"' in httpx.get(live.url + "/metrics").text


def test_per_row_sampling_draws_what_each_row_draws_alone():
    import numpy as np

    from runtime.sampling import SamplingConfig, next_tokens, next_tokens_per_row

    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    configs = [SamplingConfig(do_sample=True, temperature=0.8, top_p=0.9, seed=5), SamplingConfig(),
               SamplingConfig(do_sample=True, top_k=7, seed=9)]
    rngs = [np.random.default_rng(c.seed) for c in configs]
    alone = [[int(next_tokens(logits[r:r + 1], c, np.random.default_rng(c.seed))[0])] for r, c in enumerate(configs)]
    assert next_tokens_per_row(logits, configs, rngs).tolist() == [a[0] for a in alone]
    assert alone[1][0] == int(logits[1].argmax())  # the greedy row keeps its argmax


def test_health_is_503_until_the_engine_is_loaded_and_local_images_stay_in_their_folder(pipe, tmp_path):
    loaded = threading.Event()

    def loader():
        loaded.wait(30)
        return pipe

    import uvicorn

    from serve import ServerConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path / "images"
    folder.mkdir()
    image = random_image(40, 40, seed=4)
    image.save(folder / "a.png")
    (tmp_path / "outside.png").write_bytes((folder / "a.png").read_bytes())
    app = create_app(config=ServerConfig(allow_local_images=str(folder)), loader=loader)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert httpx.get(url + "/health").status_code == 503
        early = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert early.status_code == 503 and early.headers["Retry-After"]
        loaded.set()
        for _ in range(200):
            if httpx.get(url + "/health").status_code == 200:
                break
            time.sleep(0.05)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

        def ask(path):
            return client.chat.completions.create(model="qwen3vl", max_tokens=4, temperature=0, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": path}},
                                             {"type": "text", "text": "What is it?"}]}])

        expected = pipe.generate(runtime_chat(image, "What is it?"), max_new_tokens=4, do_sample=False)
        assert ask("a.png").choices[0].message.content == expected.text
        for path in ("../outside.png", str(tmp_path / "outside.png")):
            with pytest.raises(openai.BadRequestError):
                ask(path)
    finally:
        loaded.set()
        server.should_exit = True
        thread.join(10)
        app.state.batcher().close()


def test_serve_command_answers_over_http(tiny_engine):
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "commands", "serve", "--engine", str(tiny_engine("gqa2-tied")),
                                "--port", str(port), "--backend", "ort", "--threads", "1", "--api-key", KEY],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="qwen3vl", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
    finally:
        process.terminate()
        process.wait(20)


def test_a_bad_row_in_a_batch_fails_alone(server, pipe):
    good = pipe.generate([{"role": "user", "content": PROMPT}], max_new_tokens=6, do_sample=False)
    thin = random_image(2, 600, seed=1)  # an aspect ratio over 200:1: refused when the batch is prepared

    def ask(messages):
        try:
            return server.client().chat.completions.create(model="qwen3vl", messages=messages, max_tokens=6,
                                                           temperature=0)
        except openai.APIStatusError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(ask, image_chat(thin, "What?"))
        ok = pool.submit(ask, [{"role": "user", "content": PROMPT}])
        bad, ok = bad.result(), ok.result()
    assert isinstance(bad, openai.BadRequestError) and "aspect ratio" in bad.response.json()["error"]["message"]
    assert ok.choices[0].message.content == good.text


def test_a_non_streaming_client_that_hangs_up_cancels_its_generation(pipe):
    live = LiveServer(pipe, max_batch=1, max_queue=4, batch_window_s=0.0)
    try:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4000, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        assert_disconnect_dropped(live)
    finally:
        live.stop()


def test_load_script_reports_every_concurrency(server):
    from serve.load_test import run

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "stream": True}
    rows = [run(server.url, 4, c, body, {"Authorization": f"Bearer {KEY}"}) for c in (1, 4)]
    for row in rows:
        assert row["errors"] == 0 and row["requests_per_s"] > 0 and row["tokens_per_s"] > 0
        assert 0 < row["ttft_p50_s"] <= row["latency_p95_s"]


def test_remote_images_only_with_allow_remote_images(pipe, tmp_path):
    import functools
    import http.server

    image = random_image(40, 56, seed=6)
    image.save(tmp_path / "remote.png")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    live = LiveServer(pipe, allow_remote_images=True)
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/remote.png"
        expected = pipe.generate(runtime_chat(image, "What?"), max_new_tokens=4, do_sample=False)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What?"}]}]
        reply = live.client().chat.completions.create(model="qwen3vl", messages=messages, max_tokens=4, temperature=0)
        assert reply.choices[0].message.content == expected.text
        messages[0]["content"][0]["image_url"]["url"] = url.replace("remote.png", "missing.png")
        with pytest.raises(openai.BadRequestError, match="could not be fetched"):
            live.client().chat.completions.create(model="qwen3vl", messages=messages, max_tokens=4)
    finally:
        live.stop()
        files.shutdown()


def test_a_character_cut_by_max_tokens_streams_as_generate_shows_it(pipe):
    """The last token ends inside a character: the stream ends with what generate() shows (U+FFFD),
    not with the character's first bytes held back and dropped."""
    from test_stopping_and_streaming import byte_token
    from wrapper_backends import wrapped

    tokenizer = pipe.prompts.tokenizer
    cut = tokenizer.encode("Voilà: ", add_special_tokens=False).ids + [byte_token(tokenizer, b)
                                                                       for b in "世".encode()[:2]]
    forced = wrapped(pipe, {step: {0: token} for step, token in enumerate(cut)})
    chat = [{"role": "user", "content": PROMPT}]
    expected = forced.generate(chat, max_new_tokens=len(cut), do_sample=False)
    assert expected.token_ids == cut and expected.text.endswith("\ufffd")
    live = LiveServer(forced, api_key=KEY, max_batch=1, max_queue=1, batch_window_s=0.01)
    try:
        chunks = list(live.client().chat.completions.create(model="qwen3vl", messages=chat, max_tokens=len(cut),
                                                             temperature=0, stream=True))
    finally:
        live.stop()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
