"""The HTTP face of `internlm-kit serve`: OpenAI's chat-completions API and the chat page, on FastAPI.

Handlers stay small: the body is validated by `schema`, the prompt is built by the tokenizer's own
chat template, and generation is the scheduler's job. Every error a client can cause comes back as
OpenAI's error JSON with the right status; none of them reaches the engine thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from setup_kit.serve import schema
from setup_kit.serve.scheduler import BatchScheduler, Event, QueueFull, SamplingParams
from setup_kit.serve.scheduler import Request as GenRequest

log = logging.getLogger("internlm_kit.serve")

DEFAULT_TEMPERATURE = 0.8  # the model card's sampling defaults, as in `internlm-kit chat`
DEFAULT_TOP_P = 0.8
RETRY_AFTER_SECONDS = 2


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


@dataclass
class ServedModel:
    """What the server serves: a name for `/v1/models`, a tokenizer for prompts, a scheduler to run them."""

    id: str
    tokenizer: object
    scheduler: BatchScheduler
    created: int = field(default_factory=schema.now)
    system: str | None = None  # put before a conversation with no system message; None: InternLM's own

    @property
    def context_window(self) -> int:
        return self.scheduler.context_window


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation plus the assistant prefix, by the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def error_response(exc: APIError) -> JSONResponse:
    body = schema.ErrorResponse(error=schema.ErrorBody(message=exc.message, type=exc.type,
                                                       param=exc.param, code=exc.code))
    return JSONResponse(body.model_dump(), status_code=exc.status, headers=exc.headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"The request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})."
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg')}")
    return "Invalid request: " + "; ".join(parts[:5])


def create_app(served: ServedModel, *, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(served.scheduler.stop)

    app = FastAPI(title="internlm-kit", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(APIError(400, _describe_validation(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"Internal server error: {type(exc).__name__}", "server_error"))

    def check_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "Missing API key: send it as 'Authorization: Bearer KEY'.",
                           "authentication_error", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.id, **served.scheduler.load}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        card = schema.ModelCard(id=served.id, created=served.created, context_window=served.context_window)
        return schema.ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: schema.ChatCompletionRequest, http_request: Request):
        if body.model and body.model != served.id:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{served.id}'.",
                           "not_found_error", code="model_not_found", param="model")
        prompt = await _encode(served, body)
        room = served.context_window - len(prompt)
        limit = body.token_limit()
        params = SamplingParams(
            max_tokens=min(limit, room) if limit else room,
            temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=DEFAULT_TOP_P if body.top_p is None else body.top_p,
            seed=body.seed, stop=tuple(body.stop or ()))
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        gen = GenRequest(prompt_ids=prompt, params=params, emit=_emitter(loop, events))
        try:
            served.scheduler.submit(gen)
        except QueueFull:
            raise APIError(503, "The server is busy: every slot is generating and the queue is full. "
                                "Retry in a moment.", "server_overloaded", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        reply = _Reply(served.id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(reply, gen, events, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(reply, gen, events, http_request)

    static = resources.files("setup_kit.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"))

    return app


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
    """Hand events from the engine thread to this request's handler on the event loop."""
    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody is listening
            pass
    return emit


def with_default_system(messages: list[dict], system: str | None = None) -> list[dict]:
    """The server's system prompt (InternLM's own unless `serve --system` set another; "" for none) in
    front of a conversation that brings none, as `internlm-kit chat` and LMDeploy's api_server do: the
    same question gets the same prompt whichever way it is asked. A system message replaces it."""
    from setup_kit.engines.base import DEFAULT_SYSTEM_PROMPT

    system = DEFAULT_SYSTEM_PROMPT if system is None else system
    if not system or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


async def _encode(served: ServedModel, body: schema.ChatCompletionRequest) -> list[int]:
    try:
        prompt = await run_in_threadpool(encode_chat, served.tokenizer, with_default_system(body.chat_messages(), served.system))
    except Exception as exc:  # the template rejects the conversation (e.g. roles out of order)
        raise APIError(400, f"These messages cannot be turned into a prompt: {exc}", param="messages") from None
    if len(prompt) >= served.context_window:
        raise APIError(400, f"This model's maximum context length is {served.context_window} tokens, but the "
                            f"messages take {len(prompt)} tokens. Shorten the conversation or start a new one.",
                       code="context_length_exceeded", param="messages")
    return prompt


class _Reply:
    def __init__(self, model: str):
        self.id, self.created, self.model = schema.completion_id(), schema.now(), model
        # Content chunks are most of a stream: render the schema once, splice each piece in.
        marker = "\u0000"
        template = self.chunk(schema.Delta(content=marker))
        self._content_head, self._content_tail = template.split(json.dumps(marker))

    def content(self, text: str) -> str:
        return self._content_head + json.dumps(text, ensure_ascii=False) + self._content_tail

    def chunk(self, delta: schema.Delta | None = None, finish: str | None = None,
              usage: schema.Usage | None = None) -> str:
        choices = [] if delta is None else [schema.ChunkChoice(delta=delta, finish_reason=finish)]
        chunk = schema.ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                           choices=choices, usage=usage).model_dump()
        for choice in chunk["choices"]:  # a delta carries only what changed, as OpenAI's do
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(event: Event) -> schema.Usage:
    return schema.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                        total_tokens=event.prompt_tokens + event.completion_tokens)


def _error_data(message: str) -> str:
    body = {"error": {"message": f"Generation failed: {message}", "type": "server_error",
                      "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\n"


async def _sse(reply: _Reply, gen: GenRequest, events: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
    try:
        yield reply.chunk(schema.Delta(role="assistant", content=""))
        while True:
            event = await events.get()
            if event.text:
                yield reply.content(event.text)
            if event.finish_reason is None:
                continue
            if event.finish_reason == "error":
                yield _error_data(event.error or "unknown error")
            else:
                finish = "length" if event.finish_reason == "length" else "stop"
                yield reply.chunk(schema.Delta(), finish=finish)
                if include_usage:
                    yield reply.chunk(usage=_usage(event))
            yield "data: [DONE]\n\n"
            return
    finally:
        # Client gone (the generator is closed or cancelled) or reply done: free the slot either way.
        gen.cancel.set()


async def _complete(reply: _Reply, gen: GenRequest, events: asyncio.Queue, http_request: Request):
    pieces: list[str] = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http_request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            pieces.append(event.text)
            if event.finish_reason is None:
                continue
            if event.finish_reason == "error":
                raise APIError(500, f"Generation failed: {event.error}", "server_error")
            finish = "length" if event.finish_reason == "length" else "stop"
            choice = schema.Choice(message=schema.ResponseMessage(content="".join(pieces)), finish_reason=finish)
            return schema.ChatCompletion(id=reply.id, created=reply.created, model=reply.model,
                                         choices=[choice], usage=_usage(event)).model_dump()
    finally:
        gen.cancel.set()
