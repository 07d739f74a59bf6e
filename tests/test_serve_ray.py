"""The server as a Ray Serve deployment with 2 replicas on a local Ray instance (tiny engine, one thread
each) gives the same answers as Pipeline.generate (and so as the single-process server). Slow: Ray
starts in ~30 s on 2 cores; `pytest -m slow tests/test_serve_ray.py` with `ray[serve]` installed."""

from __future__ import annotations

import socket
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'ray[serve]')")
openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx comes with the openai client")

pytestmark = pytest.mark.slow


def test_two_ray_serve_replicas_answer_like_pipeline_generate(tiny_engine):
    from ray import serve

    from runtime import Pipeline
    from serve.ray_app import deployment

    engine = str(tiny_engine("gqa2-tied"))
    pipe = Pipeline.load(engine, backend="ort", threads=1)
    prompts = ["Hi", "Describe the picture in detail.", "What is this?", "Tell a story."]
    expected = [pipe.generate([{"role": "user", "content": p}], max_new_tokens=6, do_sample=False).text
                for p in prompts]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(engine, replicas=2, threads=1, backend="ort"), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        replicas = serve.status().applications["default"].deployments["Qwen3VLServer"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        answers = [client.chat.completions.create(model="qwen3vl", messages=[{"role": "user", "content": p}],
                                                  max_tokens=6, temperature=0).choices[0].message.content
                   for p in prompts]
        assert answers == expected
    finally:
        serve.shutdown()
        ray.shutdown()
