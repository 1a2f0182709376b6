"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

POST /v1/completions (prompt, max_tokens, temperature, top_p, top_k, stop, seed, stream
with server-sent events), GET /v1/models, GET /health and GET /metrics (Prometheus
text). With an API key, every request needs `Authorization: Bearer KEY` (the docs at
/docs, /redoc and /openapi.json too).

Every field is bounded (the constants below and generate.py's), and so is the body
(413 before it is read whole); a request the engine fails gets a 500, and the others go
on. If the engine's loop itself stops, /health answers 503 and `serve` shuts down.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmjax.data.tokenizers import Tokenizer
from lmjax.errors import RunError
from lmjax.serve.engine import (
    Engine,
    EngineStoppedError,
    Job,
    PromptTooLongError,
    QueueFullError,
)
from lmjax.serve.generate import (
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    SEED_LIMIT,
    SamplingParams,
    stop_problem,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Request limits of a shared server (the sampling ones are in generate.py).
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a prompt at its limit, escaped, fits several times over
MAX_PROMPT_CHARS = 65_536  # beyond any context window served here (truncate keeps the end)
MAX_MODEL_CHARS = 256
log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions API that lmjax honours; others are ignored.

    Every field is bounded: a request that validates can be sampled and afforded."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    # lmjax's extension: keep the prompt's last tokens instead of rejecting a long one.
    truncate: bool = False

    # Validators rather than constrained types: a union of constrained types reports the
    # first member's error ("should be a valid string") for a list that is too long.
    @field_validator("prompt")
    @classmethod
    def _prompt_length(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if any(len(p) > MAX_PROMPT_CHARS for p in prompts):
            raise ValueError(f"at most {MAX_PROMPT_CHARS} characters; shorten the prompt")
        return prompt

    @field_validator("stop")
    @classmethod
    def _stop_sizes(cls, stop):
        if problem := stop_problem([stop] if isinstance(stop, str) else stop or []):
            raise ValueError(problem)
        return stop


class Metrics:
    """Prometheus metrics of one server (its own registry, so servers do not collide)."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("lmjax_queue_depth", "jobs waiting for a decode slot", registry=r).set_function(
            lambda: max(engine.pending() - engine.slots_in_use(), 0))
        Gauge("lmjax_slots_in_use", "decode slots holding a job", registry=r).set_function(
            engine.slots_in_use)
        Gauge("lmjax_slots_total", "decode slots", registry=r).set(engine.slots)
        Gauge("lmjax_tokens_generated", "tokens generated since start",
              registry=r).set_function(lambda: engine.stats.tokens_generated)
        self.requests = Counter("lmjax_requests", "completion requests by outcome",
                                ["outcome"], registry=r)
        self.ttft = Histogram("lmjax_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lmjax_time_per_output_token_seconds",
                              "mean time between output tokens of a request",
                              buckets=LATENCY_BUCKETS, registry=r)

    def finished(self, job: Job) -> None:
        self.requests.labels(job.finish_reason).inc()
        if job.first_token_time is None or job.finish_reason == "cancelled":
            return
        self.ttft.observe(job.first_token_time - job.arrival)
        if len(job.out) > 1:
            self.tpot.observe((job.finish_time - job.first_token_time) / (len(job.out) - 1))


def create_app(engine: Engine, tokenizer: Tokenizer, *, model_name: str = "lmjax",
               api_key: str | None = None) -> FastAPI:
    """The app; the engine's loop starts with the app and stops (draining) with it."""
    metrics = Metrics(engine)
    state = {"draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        state["draining"] = True
        await asyncio.to_thread(engine.stop, True)

    app = FastAPI(title="lmjax", lifespan=lifespan)
    _add_error_handlers(app)
    app.add_middleware(LimitBody)
    if api_key is not None:  # added last: runs first, before any body is read
        app.add_middleware(RequireKey, api_key=api_key)

    @app.get("/health")
    async def health():
        if not engine.alive and not state["draining"]:
            return JSONResponse(status_code=503, content={
                "status": "engine stopped", "error": _engine_error(engine)})
        return {"status": "draining" if state["draining"] else "ok",
                "slots": engine.slots, "slots_in_use": engine.slots_in_use()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "lmjax"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if state["draining"]:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        job, events = _submit(engine, tokenizer, body, metrics)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            return StreamingResponse(_stream(engine, job, events, meta),
                                     media_type="text/event-stream")
        return await _complete(engine, job, events, meta, request)

    return app


class RequireKey:
    """ASGI middleware: every HTTP request needs the key, the docs FastAPI adds (/docs,
    /redoc, /openapi.json) and unknown paths included, which route dependencies miss.
    It answers before the body is read."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not secrets.compare_digest(given, self.expected):
                response = _error(401, "missing or wrong API key: send 'Authorization: "
                                  "Bearer KEY'", kind="authentication_error")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class LimitBody:
    """ASGI middleware: a body over MAX_BODY_BYTES gets 413 before it is read whole, at
    once when Content-Length says so, else when the bytes received pass the limit.
    (FastAPI's own max_body_size answers plain text, not OpenAI's error shape.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return await _too_large()(scope, receive, send)
        received = 0

        async def receive_counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:  # FastAPI passes an HTTPException on: http_error
                raise StarletteHTTPException(413)
            return message

        await self.app(scope, receive_counted, send)


def _too_large() -> JSONResponse:
    return _error(413, f"request body: larger than {MAX_BODY_BYTES} bytes; send a shorter "
                  f"prompt (at most {MAX_PROMPT_CHARS} characters) or fewer stop strings")


def _engine_error(engine: Engine) -> str:
    err = engine.error
    what = f"{type(err).__name__}: {err}" if err is not None else "its loop is not running"
    return f"the engine stopped ({what}); restart the server"


def _error_content(message, param=None, kind="invalid_request_error") -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error(status, message, param=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content=_error_content(message, param, kind))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('msg')}")
        # The top-level field: deeper parts of `loc` name union members ("str",
        # "list[str]") and list positions, which say less than the message does.
        loc = [p for p in first.get("loc", ()) if p != "body"]
        field = str(loc[0]) if loc else None
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        return _error(422, f"{field or 'body'}: {message}", field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        if exc.status_code == 413:  # LimitBody counted past the limit
            return _too_large()
        return _error(exc.status_code, str(exc.detail))


def _options(body: CompletionRequest) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    # The schema holds the same bounds (generate.py's constants), so this never raises.
    return SamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature,
                          top_k=body.top_k, top_p=body.top_p, seed=seed, stop=stop)


def _prompt_ids(tokenizer: Tokenizer, body: CompletionRequest, block: int) -> list[int]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt: give exactly one prompt string", "prompt")
    try:
        ids = [int(i) for i in tokenizer.encode(prompts[0])]
    except (KeyError, ValueError) as err:
        raise ApiError(400, f"prompt: cannot be tokenized ({err})", "prompt") from err
    if not ids:
        raise ApiError(400, "prompt: is empty; give at least one character", "prompt")
    if len(ids) > block:
        if not body.truncate:
            raise ApiError(400, f"prompt: {len(ids)} tokens exceed the context window of "
                           f"{block} tokens; shorten it or set truncate=true", "prompt")
        ids = ids[-max(block - body.max_tokens, 1):]
    return ids


def _submit(engine: Engine, tokenizer: Tokenizer, body: CompletionRequest, metrics: Metrics):
    """Queues the job; its events arrive on an asyncio queue of the calling loop."""
    ids = _prompt_ids(tokenizer, body, engine.block)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_event(job: Job, text: str, finished: bool) -> None:  # engine thread
        if finished:
            metrics.finished(job)
        loop.call_soon_threadsafe(events.put_nowait, (text, finished))

    try:
        job = engine.submit(ids, _options(body), on_event)
    except QueueFullError as err:
        metrics.requests.labels("rejected").inc()
        raise ApiError(429, str(err), kind="rate_limit_error") from err
    except PromptTooLongError as err:
        raise ApiError(400, f"prompt: {err}", "prompt") from err
    except EngineStoppedError as err:
        raise ApiError(503, str(err), kind="server_error") from err
    return job, events


def _job_failed(job: Job) -> ApiError:
    return ApiError(500, f"generation failed ({job.error}); the server's log has the "
                    "traceback", kind="server_error")


def _choice(text: str, reason: str | None) -> dict:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}


def _usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.out),
            "total_tokens": len(job.prompt) + len(job.out)}


async def _complete(engine: Engine, job: Job, events: asyncio.Queue, meta: dict,
                    request: Request) -> dict:
    """Waits for the whole text; a client that goes away cancels its job."""
    finished = False
    try:
        while not finished:
            try:
                _, finished = await asyncio.wait_for(events.get(), timeout=0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    return {}
    finally:
        if not finished:
            engine.cancel(job)
    if job.finish_reason == "error":
        raise _job_failed(job)
    return {**meta, "object": "text_completion", "choices": [_choice(job.sent,
                                                                       job.finish_reason)],
            "usage": _usage(job)}


async def _stream(engine: Engine, job: Job, events: asyncio.Queue, meta: dict):
    """Server-sent events in OpenAI's format; a disconnect cancels the job (finally)."""
    finished = False
    try:
        while not finished:
            text, finished = await events.get()
            if finished and job.finish_reason == "error":  # after a 200: an error event
                error = _job_failed(job)
                yield f"data: {json.dumps(_error_content(error.message, kind=error.kind))}\n\n"
                return
            reason = job.finish_reason if finished else None
            if text or finished:
                chunk = {**meta, "object": "text_completion", "choices": [_choice(text, reason)]}
                if finished:
                    chunk["usage"] = _usage(job)
                yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            engine.cancel(job)


def build_engine(loaded, *, slots: int, scheduler: str, max_jobs: int, quantize: str,
                 starvation: float | None = None, max_batch: int | None = None) -> Engine:
    """An engine over a loaded checkpoint, compiled and timed (warmup) before serving.

    MLFQ's base quantum is the measured time of the shortest prefill bucket, so short
    prompts join the first queue; the starvation threshold defaults to 100 quanta.
    """
    from lmjax.serve import quant
    from lmjax.serve.generate import Decoder
    from lmjax.serve.scheduler import make_scheduler

    params = quant.quantize(loaded.params) if quantize == "int8" else loaded.params
    decoder = Decoder(loaded.task.model, prepare=quant.dequantize)
    engine = Engine(decoder, params, make_scheduler("fcfs"), slots=slots, max_batch=max_batch,
                    max_jobs=max_jobs, detokenize=lambda ids: loaded.tokenizer.decode(ids))
    engine.warmup()
    base = max(engine.estimate_prefill(1), engine.estimate_decode(1))
    engine.scheduler = make_scheduler(scheduler, base_quantum=base,
                                      starvation=starvation or 100 * base)
    return engine


def serve(loaded, *, name: str, host: str, port: int, api_key: str | None, slots: int,
          scheduler: str, max_jobs: int, quantize: str, max_batch: int | None = None) -> None:
    """Serves a loaded model (lmjax.serve.sample.load_best) over HTTP until interrupted."""
    import uvicorn

    # Failed requests and a stopped engine are logged with their tracebacks on stderr.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    engine = build_engine(loaded, slots=slots, scheduler=scheduler, max_jobs=max_jobs,
                          quantize=quantize, max_batch=max_batch)
    app = create_app(engine, loaded.tokenizer, model_name=name, api_key=api_key)
    print(f"serving {name} (step {loaded.step}, {scheduler}, {slots} slots, {quantize}) on "
          f"http://{host}:{port}/v1", flush=True)
    run_until_stopped(uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)), engine)


def run_until_stopped(server, engine: Engine) -> None:
    """Runs the uvicorn server until a signal stops it, or until the engine's loop stops:
    then the server shuts down and RunError says why (`lmjax serve` exits 1), rather
    than a live HTTP server whose requests can never be answered."""

    def watch():
        engine.stopped.wait()
        if engine.error is not None:
            log.critical("shutting the server down: %s", _engine_error(engine))
            server.should_exit = True

    threading.Thread(target=watch, name="engine-watch", daemon=True).start()
    server.run()
    if engine.error is not None:
        raise RunError(f"the server shut down because {_engine_error(engine)} (the "
                       "traceback is logged above)")
