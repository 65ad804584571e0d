"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions,
streaming as server-sent events, errors in OpenAI's shape. Generation happens on the engine's
thread, so the event loop keeps answering (health, models, new requests) while it runs."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import Engine, Event, Job, QueueFull
from .models import Served
from .protocol import ApiError, ChatRequest, CompletionRequest, Limits, refuse_unsupported


def create_app(served: Served, *, api_key: str | None = None, limits: Limits | None = None):
    limits = limits or Limits()
    engine = Engine(served.model, served.tokenizer, mixed_adapters=served.mixed, max_batch_size=limits.max_batch_size,
                    max_queue=limits.max_queue, load_adapter=served.ensure_loaded)

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.served = engine, served

    def error(exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                      type="authentication_error", code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_request_bytes:
            return error(ApiError(413, f"the request body has {length} bytes; the limit is "
                                       f"{limits.max_request_bytes}", code="request_too_large"))
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": engine.waiting, "generating": engine.busy_rows,
                "batches": engine.batches, "largest_batch": engine.largest_batch}

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "tunesmith"}
                                           for n in served.names]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _parse(request, ChatRequest, limits)
        tok = served.tokenizer
        if not tok.chat_template:
            raise ApiError(400, f"model '{req.model}' has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template itself refuses (say, roles out of order)
            raise ApiError(400, f"messages: the chat template refused them: {exc}", param="messages") from exc
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        asked = req.max_completion_tokens or req.max_tokens
        return await _respond(req, [prompt] * req.n, asked, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest, limits)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or len(prompts) * req.n > 16:
            raise ApiError(400, "prompt: between 1 and 16 completions per request (prompts x n)", param="prompt")
        ids = [served.tokenizer(p)["input_ids"] for p in prompts for _ in range(req.n)]
        if not all(ids):
            raise ApiError(400, "prompt: an empty prompt gives no token to continue from (this tokenizer adds no "
                                "beginning-of-text token)", param="prompt")
        return await _respond(req, ids, req.max_tokens, chat=False)

    async def _respond(req, prompts: list[list[int]], asked: int | None, *, chat: bool):
        if req.model not in served.names:
            raise ApiError(404, f"model '{req.model}' does not exist; this server has {', '.join(served.names)}",
                           type="not_found_error", param="model", code="model_not_found")
        longest = max(len(p) for p in prompts)
        # Without a max_tokens the default only goes as far as the context leaves room for.
        max_tokens = asked or min(limits.default_max_tokens, limits.max_tokens,
                                  max(served.context_length - longest, 1))
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens: {max_tokens} is above this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        if longest + max_tokens > served.context_length:
            asks = f"max_tokens asks for {max_tokens}" if asked else "that leaves no room for an answer"
            raise ApiError(400, f"this model's context is {served.context_length} tokens; the prompt has {longest} "
                                f"and {asks}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        adapter = served.adapter_for(req.model)
        jobs = []
        for i, p in enumerate(prompts):
            def emit(ev: Event, i=i):
                loop.call_soon_threadsafe(events.put_nowait, (i, ev))
            seed = None if req.seed is None else req.seed + i
            jobs.append(Job(p, max_tokens, emit, adapter=adapter, temperature=req.temperature, top_p=req.top_p,
                            stop=req.stops(), seed=seed))
        try:
            engine.submit(jobs)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", type="rate_limit_error",
                           code="queue_full") from exc
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        # prompts holds each prompt n times in a row; OpenAI counts a prompt once however many choices it gets.
        usage = {"prompt_tokens": sum(len(p) for p in prompts[::req.n])}
        if req.stream:
            stream = _stream(req, jobs, events, ident, usage, chat)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons, done = [""] * len(jobs), [None] * len(jobs), 0
        completion = 0
        try:
            while done < len(jobs):
                i, ev = await events.get()
                if ev.kind == "error":
                    raise ApiError(500, ev.text, type="server_error")
                if ev.kind == "text":
                    texts[i] += ev.text
                else:
                    reasons[i], done, completion = ev.finish_reason, done + 1, completion + ev.completion_tokens
        finally:
            for job in jobs:
                job.cancelled.set()
        usage.update(completion_tokens=completion, total_tokens=usage["prompt_tokens"] + completion)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                        "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": usage}

    async def _stream(req, jobs, events, ident, usage, chat):
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra):
            body = {"id": ident, "object": kind, "created": created, "model": req.model, "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        def choice(i, text=None, reason=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}

        done, completion = 0, 0
        try:
            if chat:
                yield chunk([choice(i, role=True) for i in range(len(jobs))])
            while done < len(jobs):
                i, ev = await events.get()
                if ev.kind == "error":
                    yield f"data: {json.dumps(ApiError(500, ev.text, type='server_error').body())}\n\n"
                    return
                if ev.kind == "text":
                    yield chunk([choice(i, ev.text)])
                else:
                    done, completion = done + 1, completion + ev.completion_tokens
                    yield chunk([choice(i, reason=ev.finish_reason)])
            if req.stream_options and req.stream_options.include_usage:
                usage = {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}
                yield chunk([], usage=usage)
            yield "data: [DONE]\n\n"
        finally:  # the client left or the stream ended: stop generating for it
            for job in jobs:
                job.cancelled.set()

    return app


async def _parse(request, cls, limits: Limits):
    from pydantic import ValidationError

    body = await request.body()
    if len(body) > limits.max_request_bytes:
        raise ApiError(413, f"the request body has {len(body)} bytes; the limit is {limits.max_request_bytes}",
                       code="request_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(data).__name__}")
    refuse_unsupported(data)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from exc
