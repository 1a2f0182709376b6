"""Mixed load against one `lmjax serve` process: valid requests with hostile ones among them.

Starts the server on a trained workdir (training the tiny config there first if it holds
no checkpoint), then sends the valid requests alone, and again all at once interleaved
with hostile ones (out-of-range fields, oversized bodies, junk JSON, missing keys,
clients that hang up mid-stream). Checks that every valid answer equals `generate`
alone, that every hostile one gets its status in OpenAI's error shape, that the
server's resident memory stays near its idle size, and that every slot is free at the
end. Prints the figures; --json writes them.

    python experiments/robustness/serve_load.py [--workdir runs/serve_tiny] [--requests 300]
"""

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)

TINY = "configs/experiments/shakespeare_char_tiny.gin"
KEY = "load-test-key"
PROMPTS = ["ROMEO:", "JULIET:", "First", "To be", "O, ", "KING", "What", "Nay,", "I am", "\n"]
STOPS = ["\n", "e", "th", " ", ":"]
# The most stop strings allowed, each as long as allowed; every one begins with a common
# character, so the checker follows many partial matches at every token.
MAX_STOPS = [c + "q" * 255 for c in "etaoinshrdlu :,."]
MB = 1 << 20


def ensure_trained(workdir: str) -> None:
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    subprocess.run([sys.executable, "-m", "lmjax.main", "train", f"--workdir={workdir}",
                    f"--gin_file={TINY}"], cwd=REPO, check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: str, port: int, slots: int, max_queue: int,
                 log) -> subprocess.Popen:
    """`lmjax serve` in its own process (its memory is measured), ready to answer; its
    output goes to the file `log` (a pipe nobody reads could fill and block it)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmjax.main", "serve", f"--workdir={workdir}", f"--port={port}",
         f"--api_key={KEY}", f"--slots={slots}", f"--max_queue={max_queue}"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    log.seek(0)
    raise RuntimeError(f"the server did not start:\n{log.read()[-3000:]}")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class PeakRss:
    """Samples a process's resident memory every 20 ms while the load runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._done = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._done.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self):
        self.peak = rss_mb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def valid_bodies(count: int, block: int, seed: int = 0) -> list[dict]:
    """Greedy and seeded sampled requests, some streamed, some with stop strings (one in
    ten with the most and longest allowed); each fits the context window, so the
    engine's answer is `generate`'s."""
    rng = random.Random(seed)
    bodies = []
    for i in range(count):
        prompt = rng.choice(PROMPTS)
        body = {"prompt": prompt, "max_tokens": rng.randint(1, block - len(prompt)),
                "temperature": 0.0 if i % 3 else 0.8, "seed": i, "stream": i % 4 == 0}
        if i % 5 == 0:
            body["stop"] = rng.sample(STOPS, rng.randint(1, 3))
        elif i % 10 == 1:
            body["stop"] = MAX_STOPS
        bodies.append(body)
    return bodies


def load(workdir: str):
    """The model as `lmjax serve` loads it: config.gin, the tokenizer, the best parameters."""
    from lmjax import configs
    from lmjax.serve.sample import load_best
    from lmjax.train.config import TrainConfig

    configs.parse([os.path.join(workdir, "config.gin")], [])
    return load_best(workdir, configs.bound(TrainConfig))


def expected_texts(loaded, bodies: list[dict]) -> list[str]:
    """Each request generated alone (one batched call: rows never depend on each other)."""
    from lmjax.serve.generate import Decoder, SamplingParams, generate

    prompts = [loaded.tokenizer.encode(b["prompt"]).tolist() for b in bodies]
    options = [SamplingParams(max_new_tokens=b["max_tokens"], temperature=b["temperature"],
                              seed=b["seed"], stop=tuple(b.get("stop", ()))) for b in bodies]
    out = generate(Decoder(loaded.task.model), loaded.params, prompts, options,
                   detokenize=loaded.tokenizer.decode)
    return [g.text for g in out]


def _json(body) -> bytes:
    return json.dumps(body).encode()


async def _chunks(data: bytes, size: int = 1 << 16):
    """The body as a stream: httpx sends it chunked, without a Content-Length."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def hostile_cases() -> dict[str, tuple[int, dict]]:
    """name -> (expected status, keyword arguments of the POST to /v1/completions)."""
    huge = _json({"prompt": "a" * (20 * MB)})
    two_mb = _json({"prompt": "a" * (2 * MB)})
    return {
        "top_k 2**31 (killed the engine)": (422, {"content": _json(
            {"prompt": "ROMEO:", "max_tokens": 4, "top_k": 2**31})}),
        "top_k 10**30": (422, {"content": _json({"prompt": "a", "top_k": 10**30})}),
        "seed -1": (422, {"content": _json({"prompt": "a", "seed": -1})}),
        "max_tokens 10**12": (422, {"content": _json({"prompt": "a", "max_tokens": 10**12})}),
        "temperature NaN": (422, {"content": b'{"prompt": "a", "temperature": NaN}'}),
        "n 5": (422, {"content": _json({"prompt": "a", "n": 5})}),
        "10,000 stop strings of 300 characters": (413, {"content": _json(
            {"prompt": "a", "stop": ["x" * 300] * 10_000})}),
        "17 stop strings": (422, {"content": _json({"prompt": "a", "stop": list("abcdefghijk"
                                                                               "lmnopq")})}),
        "a 257-character stop string": (422, {"content": _json({"prompt": "a",
                                                                 "stop": "x" * 257})}),
        "20 MB prompt (Content-Length)": (413, {"content": huge}),
        "2 MB prompt, chunked": (413, {"content": lambda: _chunks(two_mb)}),
        "65,537-character prompt, truncate": (422, {"content": _json(
            {"prompt": "a" * 65_537, "truncate": True})}),
        "character outside the vocabulary": (400, {"content": _json({"prompt": "\u00e9"})}),
        "malformed JSON": (400, {"content": b'{"prompt": "a",'}),
        "JSON nested 100,000 deep": (400, {"content": b"[" * 100_000 + b"]" * 100_000}),
        "a JSON list as the body": (422, {"content": b"[1, 2]"}),
        "no API key": (401, {"content": _json({"prompt": "a"}), "headers": {}}),
        "GET /docs without the key": (401, {"path": "/docs", "headers": {}}),
        "GET /openapi.json without the key": (401, {"path": "/openapi.json", "headers": {}}),
    }


async def _post(client, url, path="/v1/completions", **kwargs) -> httpx.Response:
    """A POST with the key (unless `headers` says otherwise); a GET when there is no body."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kwargs["headers"] = {"Content-Type": "application/json", **kwargs.get("headers", headers)}
    if "content" not in kwargs:
        return await client.get(url + path, **kwargs)
    return await client.post(url + path, **kwargs)


def _text(r: httpx.Response, stream: bool) -> str | None:
    if r.status_code != 200:
        return None
    if not stream:
        return r.json()["choices"][0]["text"]
    if not r.text.endswith("data: [DONE]\n\n"):
        return None
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events)


async def _valid(client, url, body, want, latencies) -> bool:
    start = time.perf_counter()
    r = await _post(client, url, content=_json(body))
    latencies.append(time.perf_counter() - start)
    return _text(r, body["stream"]) == want


async def _hostile(client, url, name, kwargs, outcomes) -> None:
    if callable(kwargs.get("content")):  # a stream is read once: a new one each time
        kwargs = {**kwargs, "content": kwargs["content"]()}
    try:
        r = await _post(client, url, **kwargs)
        shaped = set(r.json().get("error", {})) == {"message", "type", "param", "code"}
        outcomes[name].append(r.status_code if shaped else f"{r.status_code} (not the shape)")
    except httpx.HTTPError as err:
        outcomes[name].append(type(err).__name__)


async def _hang_up(client, url, outcomes) -> None:
    """A streaming client that goes away after its first event (its slot must free)."""
    body = {"prompt": "ROMEO:", "max_tokens": 20, "stream": True}
    async with client.stream("POST", url + "/v1/completions", content=_json(body),
                             headers={"Authorization": f"Bearer {KEY}"}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break
    outcomes["client hangs up mid-stream"].append("closed")


async def run_load(url, bodies, wants, repeats: int) -> dict:
    """The valid requests all at once, with `repeats` of each hostile case among them."""
    cases = hostile_cases() if repeats else {}
    outcomes, latencies = collections.defaultdict(list), []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        tasks = [_valid(client, url, b, w, latencies) for b, w in zip(bodies, wants,
                                                                       strict=True)]
        for name, (_, kwargs) in cases.items():
            tasks += [_hostile(client, url, name, dict(kwargs), outcomes)
                      for _ in range(repeats)]
        tasks += [_hang_up(client, url, outcomes) for _ in range(repeats)]
        order = list(range(len(tasks)))
        random.Random(1).shuffle(order)
        start = time.perf_counter()
        results = await asyncio.gather(*(tasks[i] for i in order))
        wall = time.perf_counter() - start
    correct = sum(1 for i, ok in zip(order, results, strict=True) if i < len(bodies) and ok)
    latencies.sort()
    return {"valid": len(bodies), "correct": correct, "wall_s": round(wall, 2),
            "p50_s": round(latencies[len(latencies) // 2], 3),
            "p99_s": round(latencies[int(len(latencies) * 0.99)], 3),
            "hostile": {name: dict(collections.Counter(map(str, got)))
                        for name, got in outcomes.items()},
            "expected": {name: expected for name, (expected, _) in cases.items()}}


def _gauge(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith(name + " "))


def _settled(url: str, timeout: float = 30) -> dict:
    """Slots and queue once the cancelled streams have been noticed (next token)."""
    deadline = time.time() + timeout
    while time.time() < deadline and _gauge(url, "lmjax_slots_in_use"):
        time.sleep(0.1)
    health = httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"})
    return {"slots_in_use": _gauge(url, "lmjax_slots_in_use"),
            "queue_depth": _gauge(url, "lmjax_queue_depth"), "health": health.status_code}


def measure(workdir: str, requests: int = 300, repeats: int = 4, slots: int = 8,
            port: int | None = None) -> dict:
    """Every figure of one run: the valid load alone, then with the hostile requests."""
    ensure_trained(workdir)
    loaded = load(workdir)
    bodies = valid_bodies(requests, loaded.task.model.config.block_size)
    wants = expected_texts(loaded, bodies)
    port = port or free_port()
    log = tempfile.TemporaryFile("w+")
    proc = start_server(workdir, port, slots, max_queue=4 * (requests + 20 * repeats), log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(run_load(url, bodies[:5], wants[:5], repeats=0))  # warm: compiled paths
        idle = rss_mb(proc.pid)
        with PeakRss(proc.pid) as alone_rss:
            alone = asyncio.run(run_load(url, bodies, wants, repeats=0))
        with PeakRss(proc.pid) as mixed_rss:
            mixed = asyncio.run(run_load(url, bodies, wants, repeats=repeats))
        end = _settled(url)
        final = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(120)
        log.seek(0)
        server_log = log.read()
    return {"alone": alone, "mixed": mixed, "end": end, "server_log_tail": server_log[-2000:],
            "rss_mb": {"idle": round(idle), "peak_alone": round(alone_rss.peak),
                       "peak_mixed": round(mixed_rss.peak), "end": round(final)}}


def report(figures: dict) -> str:
    mixed, alone, rss = figures["mixed"], figures["alone"], figures["rss_mb"]
    lines = [f"valid requests alone: {alone['correct']}/{alone['valid']} equal to generate, "
             f"{alone['wall_s']} s, p50 {alone['p50_s']} s, p99 {alone['p99_s']} s",
             f"with hostile ones:    {mixed['correct']}/{mixed['valid']} equal to generate, "
             f"{mixed['wall_s']} s, p50 {mixed['p50_s']} s, p99 {mixed['p99_s']} s",
             f"server RSS (MB): idle {rss['idle']}, peak alone {rss['peak_alone']}, peak "
             f"mixed {rss['peak_mixed']} (+{rss['peak_mixed'] - rss['idle']}), end {rss['end']}",
             f"at the end: {figures['end']}", "", "| case | expected | got |",
             "| --- | --- | --- |"]
    expected = {**mixed["expected"], "client hangs up mid-stream": "its slot frees"}
    for name, want in expected.items():
        got = mixed["hostile"].get(name, {})
        lines.append(f"| {name} | {want} | " + ", ".join(f"{k} x{n}" for k, n in got.items())
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/serve_tiny")
    parser.add_argument("--requests", type=int, default=300, help="valid requests")
    parser.add_argument("--repeats", type=int, default=4, help="copies of each hostile case")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--port", type=int, default=None, help="default: a free one")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    figures = measure(args.workdir, args.requests, args.repeats, args.slots, args.port)
    print(report(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in figures.items() if k != "server_log_tail"}, f,
                      indent=1)


if __name__ == "__main__":
    main()
