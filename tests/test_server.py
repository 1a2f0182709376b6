"""The HTTP server: the official `openai` client completes and streams; bad input, auth,
queue limits, disconnects and load behave; the `serve` command starts and drains."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import openai
import pytest
import uvicorn
from conftest import REPO, run_cli, tiny_args
from flax import linen as nn

from lmjax.data.tokenizers import CharTokenizer
from lmjax.models import GPT, GPTConfig
from lmjax.serve.engine import Engine
from lmjax.serve.generate import Decoder, SamplingParams, generate
from lmjax.serve.scheduler import make_scheduler
from lmjax.serve.server import create_app

KEY = "test-key"
TOKENIZER = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?\n")
CONFIG = GPTConfig(vocab_size=TOKENIZER.vocab_size, block_size=128, num_layers=2, num_heads=2,
                   embed_dim=32)
SLOTS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    model = GPT(CONFIG)
    init = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))))
    params = init(jax.random.key(0))["params"]
    decoder = Decoder(model)
    engine = Engine(decoder, params, make_scheduler("mlfq", base_quantum=0.01, starvation=1.0),
                    slots=SLOTS, max_jobs=40, detokenize=lambda ids: TOKENIZER.decode(ids))
    engine.warmup()
    port = _free_port()
    app = create_app(engine, TOKENIZER, model_name="tiny", api_key=KEY)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "decoder": decoder,
           "params": params}
    srv.should_exit = True
    thread.join(timeout=30)


def _client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0)


def _expected(server, prompt, max_tokens, seed, temperature=0.0):
    opts = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    out = generate(server["decoder"], server["params"], [TOKENIZER.encode(prompt)], opts)[0]
    return TOKENIZER.decode(out.tokens)


def _metric(server, name) -> float:
    text = httpx.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1))


def test_openai_client_completes(server):
    result = _client(server).completions.create(model="tiny", prompt="To be", max_tokens=12,
                                                temperature=0.7, seed=5)
    assert result.choices[0].text == _expected(server, "To be", 12, 5, temperature=0.7)
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 12 and result.usage.prompt_tokens == 5


def test_openai_client_streams(server):
    stream = _client(server).completions.create(model="tiny", prompt="Hello", max_tokens=20,
                                                temperature=0, stream=True)
    chunks = list(stream)
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == _expected(server, "Hello", 20, 0)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_over_http(server):
    free = _expected(server, "abc", 20, 0)
    stop = free[6:8]
    result = _client(server).completions.create(model="tiny", prompt="abc", max_tokens=20,
                                                temperature=0, stop=[stop])
    assert result.choices[0].text == free[: free.find(stop)]
    assert result.choices[0].finish_reason == "stop"


def test_models_health_metrics(server):
    assert [m.id for m in _client(server).models.list()] == ["tiny"]
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server["url"] + "/health", headers=headers).json()["status"] == "ok"
    text = httpx.get(server["url"] + "/metrics", headers=headers).text
    for name in ("lmjax_queue_depth", "lmjax_slots_in_use", "lmjax_tokens_generated",
                 "lmjax_time_to_first_token_seconds_bucket",
                 "lmjax_time_per_output_token_seconds_bucket"):
        assert name in text


def test_wrong_or_missing_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").completions.create(model="tiny", prompt="a", max_tokens=2)
    assert httpx.get(server["url"] + "/health").status_code == 401
    assert httpx.get(server["url"] + "/metrics").status_code == 401


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": "a", "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "a", "top_p": 1.5}, 422, "top_p"),
    ({"prompt": "a", "temperature": -1}, 422, "temperature"),
    ({"prompt": "a", "top_k": "many"}, 422, "top_k"),
    ({"max_tokens": 3}, 422, "prompt"),
    ({"prompt": "", "max_tokens": 3}, 400, "prompt"),
    ({"prompt": "a\u00e9", "max_tokens": 3}, 400, "prompt"),
])
def test_bad_parameters_name_the_field(server, body, status, field):
    r = httpx.post(server["url"] + "/v1/completions", json=body,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    assert field in r.json()["error"]["message"]


def test_malformed_json_is_400(server):
    r = httpx.post(server["url"] + "/v1/completions", content=b'{"prompt": "a",',
                   headers={"Authorization": f"Bearer {KEY}",
                            "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_too_long_prompt_names_the_limit(server):
    with pytest.raises(openai.BadRequestError, match="context window of 128"):
        _client(server).completions.create(model="tiny", prompt="a" * 129, max_tokens=2)
    result = _client(server).completions.create(model="tiny", prompt="a" * 200, max_tokens=4,
                                                extra_body={"truncate": True})
    assert len(result.choices[0].text) == 4 and result.usage.prompt_tokens == 124


def test_queue_full_is_429(server):
    engine = server["engine"]
    parked, release = threading.Event(), threading.Event()

    def park(job, text, finished):  # runs in the engine thread: holds it until released
        if finished:
            parked.set()
            release.wait(60)

    # Parking the engine keeps the queued jobs queued however fast it decodes.
    engine.submit([1], SamplingParams(max_new_tokens=1), park)
    try:
        assert parked.wait(30)
        blockers = [engine.submit([1], SamplingParams(max_new_tokens=1))
                    for _ in range(engine.max_jobs - engine.pending())]
        assert engine.pending() == engine.max_jobs
        with pytest.raises(openai.RateLimitError):
            _client(server).completions.create(model="tiny", prompt="a", max_tokens=2)
    finally:
        release.set()
    for job in blockers:
        assert job.done.wait(30)


def test_disconnect_mid_stream_frees_the_slot(server):
    before = _metric(server, 'lmjax_requests_total{outcome="cancelled"}') \
        if "cancelled" in httpx.get(server["url"] + "/metrics",
                                    headers={"Authorization": f"Bearer {KEY}"}).text else 0.0
    body = {"prompt": "a", "max_tokens": 127, "temperature": 0, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    deadline = time.time() + 10
    while time.time() < deadline and _metric(server, "lmjax_slots_in_use") > 0:
        time.sleep(0.05)
    assert _metric(server, "lmjax_slots_in_use") == 0
    assert _metric(server, 'lmjax_requests_total{outcome="cancelled"}') == before + 1


async def _load(url, requests, concurrency, max_tokens):
    limit = asyncio.Semaphore(concurrency)
    errors = []

    async def one(client, i):
        async with limit:
            body = {"prompt": "abc"[: 1 + i % 3] * (1 + i % 7), "max_tokens": 1 + i % max_tokens,
                    "temperature": 0.8, "seed": i, "stream": bool(i % 2)}
            r = await client.post(url + "/v1/completions", json=body)
            if r.status_code != 200 or (body["stream"] and not r.text.endswith("[DONE]\n\n")):
                errors.append((r.status_code, r.text[:200]))

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=120) as client:
        await asyncio.gather(*(one(client, i) for i in range(requests)))
    return errors


def _check_load(server, requests, concurrency, max_tokens):
    errors = asyncio.run(_load(server["url"], requests, concurrency, max_tokens))
    assert errors == []
    assert _metric(server, "lmjax_slots_in_use") == 0
    assert _metric(server, "lmjax_queue_depth") == 0


def test_concurrent_load_has_no_errors_and_frees_every_slot(server):
    _check_load(server, requests=48, concurrency=16, max_tokens=12)


@pytest.mark.slow
def test_500_requests_at_concurrency_32(server):
    _check_load(server, requests=500, concurrency=32, max_tokens=40)


def test_serve_command_answers_and_drains_on_sigterm(tmp_path):
    """Also: serving reads no corpus (the data folders are empty while it runs)."""
    workdir = tmp_path / "run"
    trained = run_cli(*tiny_args(workdir))
    assert trained.returncode == 0, trained.stderr[-2000:]
    port = _free_port()
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               LMJAX_DATA_DIR=str(empty), LMJAX_TFDS_DIR=str(empty))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmjax.main", "serve", f"--workdir={workdir}", f"--port={port}",
         "--api_key=k", "--slots=2", "--scheduler=mlfq"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                               max_retries=0)
        deadline = time.time() + 240
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
                time.sleep(0.5)
        text = client.completions.create(model="run", prompt="ROMEO:", max_tokens=8,
                                         temperature=0).choices[0].text
        assert len(text) == 8
        # a request in flight when SIGTERM arrives still completes
        body = {"prompt": "ROMEO:", "max_tokens": 25, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                          headers={"Authorization": "Bearer k"}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        final = json.loads(rest[-2][len("data: "):])
        assert final["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has shut down cleanly
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
        assert not os.listdir(empty)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_defaults_bind_localhost():
    from lmjax.main import _parser

    args = _parser().parse_args(["serve", "--workdir=x"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
