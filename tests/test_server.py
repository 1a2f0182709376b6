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
from conftest import REPO, run_cli
from flax import linen as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


@pytest.fixture
def trained(tiny_trained):
    return tiny_trained


def test_serve_command_answers_and_drains_on_sigterm(trained, tmp_path):
    """Also: serving reads no corpus (the data folders are empty while it runs)."""
    workdir = trained
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


def test_sample_command_out_of_range_option_is_one_line_error(trained):
    """`lmjax sample --top_k=3000000000` overflowed the sampler's int32 with a traceback."""
    result = run_cli("sample", f"--workdir={trained}", "--top_k=3000000000",
                     "--max_new_tokens=4")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lmjax: error: top_k=3000000000 is out of range"), result.stderr


# -- hostile requests ---------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {KEY}"}
ERROR_KEYS = {"message", "type", "param", "code"}


def _post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(server["url"] + "/v1/completions", json=body, headers=AUTH,
                      timeout=kwargs.pop("timeout", 60), **kwargs)


def _assert_alive(server):
    """The engine still answers: health is ok and a request completes."""
    assert httpx.get(server["url"] + "/health", headers=AUTH).json()["status"] == "ok"
    r = _post(server, {"prompt": "abc", "max_tokens": 3, "temperature": 0}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == _expected(server, "abc",
                                                                                3, 0)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "ROMEO", "max_tokens": 4, "top_k": 2147483648}, "top_k"),  # killed the engine
    ({"prompt": "a", "top_k": 10**30}, "top_k"),
    ({"prompt": "a", "max_tokens": 10**12}, "max_tokens"),
    ({"prompt": "a", "stop": list("abcdefghijklmnopq")}, "stop"),  # 17 strings
    ({"prompt": "a", "stop": "x" * 257}, "stop"),
    ({"prompt": "a", "stop": ["ok", "x" * 257]}, "stop"),
    ({"prompt": "a" * 65_537, "truncate": True}, "prompt"),
    ({"prompt": ["a" * 65_537]}, "prompt"),
    ({"prompt": "a", "model": "m" * 257}, "model"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": "a", "seed": 2**32}, "seed"),
    ({"prompt": "a", "seed": -1}, "seed"),
])
def test_out_of_bounds_fields_are_422_naming_the_field(server, body, field):
    r = _post(server, body, timeout=30)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["param"] == field
    assert error["message"].startswith(f"{field}: ")
    assert server["engine"].alive


@pytest.mark.parametrize("raw, field", [
    (b'{"prompt": "a", "temperature": NaN}', "temperature"),
    (b'{"prompt": "a", "top_p": Infinity}', "top_p"),
    (b'{"prompt": "a", "temperature": 1e400}', "temperature"),
])
def test_non_finite_numbers_are_422(server, raw, field):
    r = httpx.post(server["url"] + "/v1/completions", content=raw,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text


def test_top_k_that_overflowed_int32_leaves_the_engine_serving(server):
    """The reported crash: top_k 2**31 killed the engine thread; later requests hung."""
    r = _post(server, {"prompt": "ROMEO", "max_tokens": 4, "top_k": 2147483648}, timeout=30)
    assert r.status_code == 422
    _assert_alive(server)


def _raw_request(port: int, head: bytes, parts=(), timeout=20) -> tuple[int, dict]:
    """Sends a request head and body parts over a socket; the status and JSON body of
    the answer. Nothing beyond `parts` is ever sent, so a server that waits for the
    whole body never answers (socket timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for part in parts:
            sock.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head_text, body = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"content-length: (\d+)", head_text, re.I).group(1))
        while len(body) < length:
            body += sock.recv(65536)
    return int(head_text.split()[1]), json.loads(body)


def _head(port: int, *lines: str) -> bytes:
    return "\r\n".join(["POST /v1/completions HTTP/1.1", f"Host: 127.0.0.1:{port}",
                        f"Authorization: Bearer {KEY}", "Content-Type: application/json",
                        *lines, "", ""]).encode()


def test_body_over_the_limit_is_413_before_it_is_read(server):
    """A 20 MB prompt cost 240 MB before its 400. Now a Content-Length over the limit is
    answered at once, with no byte of the body sent; a chunked body as soon as the
    bytes received pass the limit (here 1 MiB + 64 KiB sent, the rest never)."""
    port = int(server["url"].rsplit(":", 1)[1])
    status, body = _raw_request(port, _head(port, "Content-Length: 20000000"))
    assert status == 413 and set(body["error"]) == ERROR_KEYS
    from lmjax.serve.server import MAX_BODY_BYTES

    assert str(MAX_BODY_BYTES) in body["error"]["message"]
    chunk = b"a" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (MAX_BODY_BYTES // len(chunk) + 1)
    status, body = _raw_request(port, _head(port, "Transfer-Encoding: chunked"),
                                [b'10\r\n{"prompt": "aaaa\r\n', *chunks])
    assert status == 413 and set(body["error"]) == ERROR_KEYS
    _assert_alive(server)


def test_ten_thousand_stop_strings_are_refused(server):
    """10,000 stop strings of 300 characters were accepted, and slowed every request
    about 100x while they were checked, rebuilt at every token."""
    r = _post(server, {"prompt": "a", "max_tokens": 4, "stop": ["x" * 300] * 10_000})
    assert r.status_code == 413 and set(r.json()["error"]) == ERROR_KEYS


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/no/such/path"])
def test_every_path_needs_the_key(server, path):
    """README promises 401 on every endpoint; FastAPI's docs answered without the key."""
    r = httpx.get(server["url"] + path)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server["url"] + path, headers={"Authorization": "Bearer no"}
                     ).status_code == 401
    if path != "/no/such/path":
        assert httpx.get(server["url"] + path, headers=AUTH).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_engine_fails_gets_500_and_others_go_on(server, monkeypatch, stream):
    """Any exception while preparing a job fails that job alone (here injected into the
    prefill of prompt "boom"); a request beside it completes, and later ones too."""
    engine = server["engine"]
    boom = TOKENIZER.encode("boom").tolist()
    prefill = engine._prefill

    def failing_prefill(job):
        if job.prompt == boom:
            raise RuntimeError("injected fault")
        prefill(job)

    monkeypatch.setattr(engine, "_prefill", failing_prefill)
    results = []
    with httpx.Client(headers=AUTH, timeout=60) as client:
        beside = threading.Thread(target=lambda: results.append(client.post(
            server["url"] + "/v1/completions",
            json={"prompt": "abc", "max_tokens": 20, "temperature": 0})))
        beside.start()
        r = client.post(server["url"] + "/v1/completions",
                        json={"prompt": "boom", "max_tokens": 5, "stream": stream})
        beside.join(60)
    if stream:
        assert r.status_code == 200
        event = json.loads(r.text.strip().splitlines()[-1][len("data: "):])
    else:
        assert r.status_code == 500
        event = r.json()
    assert set(event["error"]) == ERROR_KEYS and event["error"]["type"] == "server_error"
    assert "injected fault" in event["error"]["message"]
    assert results[0].json()["choices"][0]["text"] == _expected(server, "abc", 20, 0)
    _assert_alive(server)


def _spare_server(server, api_key=None):
    """A second app over a new engine of the same model (no warmup: it compiles on use),
    for tests that break its engine; and its uvicorn server, not started."""
    engine = Engine(server["decoder"], server["params"], make_scheduler("fcfs"), slots=2,
                    detokenize=lambda ids: TOKENIZER.decode(ids))
    port = _free_port()
    app = create_app(engine, TOKENIZER, model_name="spare", api_key=api_key)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    return engine, srv, f"http://127.0.0.1:{port}"


def _break(engine):
    def broken_pick(now, capacity):
        raise RuntimeError("scheduler bug")

    engine.scheduler.pick = broken_pick  # the loop dies at its next iteration with a job


def test_a_stopped_engine_fails_its_requests_and_health_says_so(server):
    """The engine thread died and /health still said ok while requests hung. Now the
    request in flight gets a 500, /health 503, and new requests 503 at once."""
    engine, srv, url = _spare_server(server)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        assert httpx.get(url + "/health").status_code == 200
        _break(engine)
        r = httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 500 and "scheduler bug" in r.json()["error"]["message"]
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "scheduler bug" in health.json()["error"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "abc"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    finally:
        srv.should_exit = True
        thread.join(30)


def test_serve_shuts_down_when_the_engine_stops(server):
    """`lmjax serve` waited out its 60 s drain on a dead engine; now the server shuts down
    and RunError (exit 1 from the CLI) names the failure."""
    from lmjax.errors import RunError
    from lmjax.serve.server import run_until_stopped

    engine, srv, url = _spare_server(server)
    raised = []

    def run():
        try:
            run_until_stopped(srv, engine)
        except RunError as err:
            raised.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    _break(engine)
    r = httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 3},
                   timeout=30)
    assert r.status_code == 500
    thread.join(30)
    assert not thread.is_alive(), "the server still runs over a stopped engine"
    assert raised and "scheduler bug" in str(raised[0])


# -- property-based: the request schema ----------------------------------------------------

FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
          "stream", "n", "truncate"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=4),
    max_leaves=12)
# Numbers where representations end: int32, uint32, int64 and float64 limits, and past them.
EDGES = st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64, -(2**31) - 1,
                         -1, 10**30, 10**400, 1e308, -0.0, 5e-324])
JUNK = (JSON_VALUES | EDGES | st.integers(-2**300, 2**300)
        | st.builds(lambda c, n: c * n, st.characters(), st.integers(0, 300_000)))
PROMPTS = st.text(alphabet=sorted(set(TOKENIZER.decode(range(TOKENIZER.vocab_size)))),
                  min_size=1, max_size=12)
SMALL_VALID = st.fixed_dictionaries({"prompt": PROMPTS, "max_tokens": st.integers(1, 4)})
# A small valid request with one field replaced: every other field passes, so the junk
# one reaches the deepest check that it can.
ONE_FIELD_WRONG = st.builds(lambda body, field, value: {**body, field: value}, SMALL_VALID,
                            st.sampled_from(FIELDS), JUNK)


def _check_answer(r: httpx.Response, stream: bool) -> None:
    """Any answer: a 4xx in the error shape, or a complete completion; never a 5xx."""
    assert r.status_code < 500, r.text[:300]
    if r.status_code >= 400:
        assert set(r.json()["error"]) == ERROR_KEYS
    elif stream:
        assert r.text.endswith("data: [DONE]\n\n"), r.text[-300:]
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(body=ONE_FIELD_WRONG | JSON_VALUES
       | st.dictionaries(st.sampled_from(FIELDS), JUNK, max_size=6))
def test_random_bodies_get_4xx_never_500(server, body):
    raw = json.dumps(body).encode()  # NaN and Infinity included, as Python's json writes
    r = httpx.post(server["url"] + "/v1/completions", content=raw, timeout=120,
                   headers={**AUTH, "Content-Type": "application/json"})
    _check_answer(r, isinstance(body, dict) and r.headers.get("content-type", "").startswith(
        "text/event-stream"))
    assert server["engine"].alive


NUMERIC = ["max_tokens", "temperature", "top_p", "top_k", "seed", "n"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=SMALL_VALID, field=st.sampled_from(NUMERIC),
       value=EDGES | st.integers(-2**70, 2**70) | st.floats())
def test_numbers_of_any_size_get_422_or_complete(server, body, field, value):
    """One number of a valid request anywhere from -2**70 to 10**400, NaN and infinities
    included (top_k 2**31 killed the engine): a 422 naming it, or a completion."""
    r = httpx.post(server["url"] + "/v1/completions", timeout=120,
                   content=json.dumps({**body, field: value}).encode(),
                   headers={**AUTH, "Content-Type": "application/json"})
    _check_answer(r, stream=False)
    assert r.status_code in (200, 422) and server["engine"].alive
    if r.status_code == 422:
        assert r.json()["error"]["param"] == field


@settings(max_examples=30, deadline=None)
@given(raw=st.binary(max_size=200))
def test_random_bytes_get_4xx(server, raw):
    r = httpx.post(server["url"] + "/v1/completions", content=raw,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500 and set(r.json()["error"]) == ERROR_KEYS


def _valid_bodies():
    from lmjax.serve.generate import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOP_K, SEED_LIMIT

    stops = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=MAX_STOP_CHARS)
    return st.fixed_dictionaries({"prompt": PROMPTS}, optional={
        "max_tokens": st.integers(1, 16), "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True), "top_k": st.integers(0, MAX_TOP_K),
        "stop": stops | st.lists(stops, max_size=MAX_STOP_STRINGS),
        "seed": st.integers(0, SEED_LIMIT - 1), "stream": st.booleans(),
        "model": st.text(max_size=20), "truncate": st.booleans()})


def _generated(server, body) -> str:
    """What `generate` alone gives for a request (the engine's answer must equal it)."""
    stop = body.get("stop", ())
    opts = SamplingParams(max_new_tokens=body.get("max_tokens", 16),
                          temperature=body.get("temperature", 1.0), top_k=body.get("top_k", 0),
                          top_p=body.get("top_p", 1.0), seed=body["seed"],
                          stop=(stop,) if isinstance(stop, str) else tuple(stop))
    out = generate(server["decoder"], server["params"], [TOKENIZER.encode(body["prompt"])],
                   opts, detokenize=TOKENIZER.decode)[0]
    return out.text


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_valid_bodies_complete_as_generate_does(server, data):
    body = data.draw(_valid_bodies())
    body.setdefault("seed", 0)  # so that the answer can be compared with `generate`
    r = _post(server, body)
    _check_answer(r, body.get("stream", False))
    assert r.status_code == 200
    if body.get("stream"):
        chunks = [json.loads(line[len("data: "):]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        text = r.json()["choices"][0]["text"]
    assert text == _generated(server, body)
