"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

POST /v1/completions (prompt, max_tokens, temperature, top_p, top_k, stop, seed, stream
with server-sent events), GET /v1/models, GET /health and GET /metrics (Prometheus
text). With an API key, every request needs `Authorization: Bearer KEY`.
"""

import asyncio
import contextlib
import json
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmjax.data.tokenizers import Tokenizer
from lmjax.serve.engine import Engine, Job, PromptTooLongError, QueueFullError
from lmjax.serve.generate import SamplingParams

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions API that lmjax honours; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    # lmjax's extension: keep the prompt's last tokens instead of rejecting a long one.
    truncate: bool = False


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

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           kind="authentication_error")

    auth = [Depends(authorize)]

    @app.get("/health", dependencies=auth)
    async def health():
        return {"status": "draining" if state["draining"] else "ok",
                "slots": engine.slots, "slots_in_use": engine.slots_in_use()}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "lmjax"}]}

    @app.get("/metrics", dependencies=auth)
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", dependencies=auth)
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


def _add_error_handlers(app: FastAPI) -> None:
    def error(status, message, param=None, kind="invalid_request_error"):
        return JSONResponse(status_code=status, content={
            "error": {"message": message, "type": kind, "param": param, "code": None}})

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON body: {first.get('msg')}")
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, f"{field}: {first.get('msg')}", field or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))


def _options(body: CompletionRequest) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    seed = body.seed if body.seed is not None else secrets.randbits(32)
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
    return job, events


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
    return {**meta, "object": "text_completion", "choices": [_choice(job.sent,
                                                                       job.finish_reason)],
            "usage": _usage(job)}


async def _stream(engine: Engine, job: Job, events: asyncio.Queue, meta: dict):
    """Server-sent events in OpenAI's format; a disconnect cancels the job (finally)."""
    finished = False
    try:
        while not finished:
            text, finished = await events.get()
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

    engine = build_engine(loaded, slots=slots, scheduler=scheduler, max_jobs=max_jobs,
                          quantize=quantize, max_batch=max_batch)
    app = create_app(engine, loaded.tokenizer, model_name=name, api_key=api_key)
    print(f"serving {name} (step {loaded.step}, {scheduler}, {slots} slots, {quantize}) on "
          f"http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=60)
