"""The HTTP face of `internlm-kit serve`: OpenAI's chat-completions API and the chat page, on FastAPI.

Handlers stay small: the body is validated by `schema`, the prompt is built by `prompt` (the
tokenizer's own chat template, control tokens only from it), and generation is the scheduler's job.
Every error a client can cause comes back as OpenAI's error JSON with the right status; none of them
reaches the engine thread, and one request's failure is never another's.

In front of the app, `_Guard` refuses what must not reach a handler at all: a body over the size
limit (413, before it is read) and, without an API key, a Host header that is not this machine's
(a web page reaching 127.0.0.1 through DNS rebinding sends its own domain there).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
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
from setup_kit.serve.grammar import GrammarError, Grammars
from setup_kit.serve.prompt import ACTION_START, PLUGIN, encode_text
from setup_kit.serve.prompt import encode_chat as _encode_chat
from setup_kit.serve.scheduler import BatchScheduler, Event, QueueFull, SamplingParams, ShuttingDown
from setup_kit.serve.scheduler import Request as GenRequest
from setup_kit.serve.tool_calls import ToolCallParser

log = logging.getLogger("internlm_kit.serve")

DEFAULT_TEMPERATURE = 0.8  # the model card's sampling defaults, as in `internlm-kit chat`
DEFAULT_TOP_P = 0.8
DEFAULT_MAX_TOKENS = 1024  # a reply's budget when the request names none (as `chat --max-new-tokens`)
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
RETRY_AFTER_SECONDS = 2
LOOPBACK_NAMES = ("localhost",)
ERROR_STATUS = {"invalid_request_error": 400, "server_shutting_down": 503}


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
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    aliases: tuple[str, ...] = ()  # other names requests may use: the folder's, the hub repo it came from
    notes: tuple[str, ...] = ()  # how the model runs, for the start-up banner (serve.cpu_linear's choice)
    _grammars: Grammars | None = field(default=None, repr=False, compare=False)

    def answers_to(self, name: str) -> bool:
        return name == self.id or name in self.aliases

    @property
    def context_window(self) -> int:
        return self.scheduler.context_window

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.scheduler.model.config, "vocab_size", 0) or len(self.tokenizer))

    @property
    def grammars(self) -> Grammars:
        """response_format's grammar compiler, made on first use."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.scheduler.eos_ids)
        return self._grammars


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation plus the assistant prefix (see `setup_kit.serve.prompt`)."""
    return _encode_chat(tokenizer, messages, tools)


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
        message = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where or 'body'}: {message}")
    return "Invalid request: " + "; ".join(parts[:5])


def host_allowed(host_header: str) -> bool:
    """Whether a Host header names this machine by address or as localhost: never a domain a web
    page could point at 127.0.0.1 (DNS rebinding)."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class _Guard:
    """ASGI middleware: the body size limit and the Host check, before any handler runs."""

    def __init__(self, app, *, max_body_bytes: int, check_host: bool):
        self.app, self.limit, self.check_host = app, max_body_bytes, check_host

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if self.check_host and not host_allowed(headers.get("host", "")):
            return await error_response(APIError(
                403, f"This server answers only requests addressed to this machine (Host "
                     f"{headers.get('host', '')!r} is not). Without --api-key only localhost and IP "
                     "addresses are served, which keeps web pages from reaching it through DNS "
                     "rebinding; start it with --api-key KEY to serve other host names.",
                "permission_error", code="host_not_allowed"))(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            body, more = [], True  # chunked: read up to the limit, then hand the body on
            size = 0
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                body.append(message.get("body", b""))
                size += len(body[-1])
                more = message.get("more_body", False)
                if size > self.limit:
                    return await self._too_large(scope, receive, send)
            receive = _replay(b"".join(body), receive)
        return await self.app(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        await error_response(APIError(
            413, f"The request body is larger than this server's limit of {self.limit / 2**20:.3g} MB "
                 f"({self.limit:,} bytes). "
                 "Send a shorter conversation, or start the server with a larger --max-body-mb.",
            code="request_too_large"))(scope, receive, send)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


def create_app(served: ServedModel, *, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.scheduler.start()
        try:
            yield
        finally:
            served.scheduler.close()
            await run_in_threadpool(served.scheduler.stop)

    app = FastAPI(title="internlm-kit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_Guard, max_body_bytes=served.max_body_bytes, check_host=not api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(APIError(400, _describe_validation(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {})))

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

    def card() -> schema.ModelCard:
        from setup_kit.engines.base import DEFAULT_SYSTEM_PROMPT

        system = DEFAULT_SYSTEM_PROMPT if served.system is None else served.system
        return schema.ModelCard(id=served.id, created=served.created, context_window=served.context_window,
                                system_prompt=system)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.id, **served.scheduler.load}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return schema.ModelList(data=[card()]).model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
    async def model(model_id: str):
        if not served.answers_to(model_id):
            raise _unknown_model(model_id, served)
        return card().model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: schema.ChatCompletionRequest, http_request: Request):
        if body.model and not served.answers_to(body.model):
            raise _unknown_model(body.model, served)
        tools = body.tools_offered()
        grammar = await _grammar(served, body, tools)
        prefix = _forced_call_prefix(body)
        prompt = await _encode(served, body, tools, prefix)
        params = _params(served, body, len(prompt), logprobs=body.logprobs_count(), special_text=bool(tools),
                         grammar=grammar)
        reply = _Reply(served.id, _Logprobs(served.tokenizer) if body.logprobs else None)
        choices = _submit_all(served, prompt, params, body.n)
        watcher = _watch_disconnect(http_request, served, choices)
        parsers = [ToolCallParser(prefix) if tools else None for _ in choices]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(reply, choices, parsers, include_usage, watcher),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(reply, choices, parsers, watcher)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: schema.CompletionRequest, http_request: Request):
        if body.model and not served.answers_to(body.model):
            raise _unknown_model(body.model, served)
        if body.stream:
            raise APIError(400, "Streaming is not offered on /v1/completions; send \"stream\": false, or use "
                                "/v1/chat/completions for streamed replies.", param="stream")
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by InternLM2 chat.", param="suffix")
        return await _plain_completion(served, body, http_request)

    static = resources.files("setup_kit.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"))

    return app


def _unknown_model(name: str, served: ServedModel) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server serves '{served.id}'.",
                    "not_found_error", code="model_not_found", param="model")


async def _grammar(served: ServedModel, body: schema.ChatCompletionRequest, tools: list[dict]):
    """response_format json_object / json_schema as a grammar the reply is decoded under (None for
    text); what cannot be honoured is a clear 400, never silently ignored."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if tools:
        raise APIError(400, "response_format together with tools is not supported: a reply constrained to "
                            "JSON cannot also call a tool. Send one of them (for structured output through "
                            'tools, a tool whose parameters are your schema with tool_choice naming it), or '
                            'tool_choice "none".', code="unsupported_parameter", param="response_format")
    spec = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
    try:  # off the event loop: the first one reads the vocabulary, a big schema takes a while
        return await run_in_threadpool(served.grammars.compile, fmt.type, spec)
    except GrammarError as exc:
        raise APIError(400, str(exc), code="unsupported_parameter", param="response_format") from None


def _forced_call_prefix(body: schema.ChatCompletionRequest) -> str:
    """tool_choice "required" or a named function: the reply is started inside the call markup."""
    choice = body.tool_choice
    if isinstance(choice, schema.ToolChoiceFunction):
        return f"{ACTION_START}{PLUGIN}\n" + json.dumps({"name": choice.function.name})[:-1] + ', "parameters": '
    if choice == "required":
        return f"{ACTION_START}{PLUGIN}\n"
    return ""


def _params(served: ServedModel, body: schema.SamplingFields, prompt_len: int, *, logprobs: int | None,
            special_text: bool = False, grammar=None) -> SamplingParams:
    room = served.context_window - prompt_len
    limit = body.token_limit() if isinstance(body, schema.ChatCompletionRequest) else body.max_tokens
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if int(key) >= served.vocab_size:
            raise APIError(400, f"logit_bias names token {key}, but this model's vocabulary has ids "
                                f"0..{served.vocab_size - 1}.", param="logit_bias")
        bias[int(key)] = float(value)
    return SamplingParams(
        max_tokens=min(limit or served.default_max_tokens, room),
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else float(body.temperature),
        top_p=DEFAULT_TOP_P if body.top_p is None else float(body.top_p),
        seed=body.seed, stop=tuple(body.stop or ()),
        frequency_penalty=float(body.frequency_penalty or 0.0),
        presence_penalty=float(body.presence_penalty or 0.0),
        logit_bias=bias, logprobs=logprobs, special_text=special_text, grammar=grammar)


@dataclass
class _Choice:
    request: GenRequest
    events: asyncio.Queue


def _submit_all(served: ServedModel, prompt: list[int], params: SamplingParams, n: int) -> list[_Choice]:
    """n requests for the one prompt (seed + i each, so choices differ but stay repeatable)."""
    from dataclasses import replace

    loop = asyncio.get_running_loop()
    choices: list[_Choice] = []
    try:
        for i in range(n):
            events: asyncio.Queue[Event] = asyncio.Queue()
            own = replace(params, seed=None if params.seed is None else params.seed + i)
            gen = GenRequest(prompt_ids=list(prompt), params=own, emit=_emitter(loop, events))
            served.scheduler.submit(gen)
            choices.append(_Choice(gen, events))
    except (QueueFull, ShuttingDown) as exc:
        for choice in choices:
            served.scheduler.cancel(choice.request)
        if isinstance(exc, ShuttingDown):
            raise APIError(503, "The server is shutting down; retry against its next start.",
                           "server_shutting_down", code="shutting_down") from None
        raise APIError(503, "The server is busy: every slot is generating and the queue is full. "
                            "Retry in a moment.", "server_overloaded", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    return choices


def _watch_disconnect(http_request: Request, served: ServedModel, choices: list[_Choice]) -> asyncio.Task:
    """Cancel the request's generation the moment its client hangs up (queued or running)."""
    async def watch():
        while True:
            message = await http_request.receive()
            if message["type"] == "http.disconnect":
                for choice in choices:
                    served.scheduler.cancel(choice.request)
                return
    return asyncio.ensure_future(watch())


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


def _too_long(served: ServedModel, tokens: int | str, what: str = "messages") -> APIError:
    return APIError(400, f"This model's maximum context length is {served.context_window} tokens, but the "
                         f"{what} take {tokens} tokens. Shorten the conversation or start a new one.",
                    code="context_length_exceeded", param=what)


def _longest_piece(tokenizer) -> int:
    """Characters in the tokenizer's longest piece: a text of more than window x this many
    characters cannot fit, which is known without tokenizing it."""
    cached = getattr(tokenizer, "_kit_longest_piece", None)
    if cached is None:
        cached = max((len(p) for p in tokenizer.get_vocab()), default=16)
        try:
            tokenizer._kit_longest_piece = cached
        except AttributeError:
            pass
    return cached


async def _encode(served: ServedModel, body: schema.ChatCompletionRequest, tools: list[dict],
                  prefix: str = "") -> list[int]:
    messages = with_default_system(body.chat_messages(), served.system)
    chars = sum(len(m["content"]) for m in messages)
    if chars > served.context_window * _longest_piece(served.tokenizer):
        raise _too_long(served, f"more than {served.context_window}")
    try:  # off the event loop: a long conversation takes a while to tokenize
        prompt = await run_in_threadpool(_encode_chat, served.tokenizer, messages, tools)
        if prefix:
            prompt += await run_in_threadpool(_encode_prefix, served.tokenizer, prefix)
    except Exception as exc:  # the template rejects the conversation (e.g. roles out of order)
        raise APIError(400, f"These messages cannot be turned into a prompt: {exc}", param="messages") from None
    if len(prompt) >= served.context_window:
        raise _too_long(served, len(prompt))
    return prompt


def _encode_prefix(tokenizer, prefix: str) -> list[int]:
    """Our own markup (control tokens by id, the rest as text) that starts the assistant's reply."""
    ids = []
    for token in (ACTION_START, PLUGIN):
        if prefix.startswith(token):
            ids.append(tokenizer.convert_tokens_to_ids(token))
            prefix = prefix[len(token):]
    return ids + encode_text(tokenizer, prefix)


class _Logprobs:
    """Token ids and log-probabilities in OpenAI's shapes (token text and its bytes)."""

    def __init__(self, tokenizer):
        self.tokenizer, self._cache = tokenizer, {}

    def token(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                text, raw = piece, [int(piece[3:5], 16)]
            else:
                text = self.tokenizer.decode([token_id])
                raw = list(text.encode("utf-8"))
            self._cache[token_id] = (text, raw)
        return self._cache[token_id]

    def chat(self, entries: list[dict] | None) -> schema.ChoiceLogprobs | None:
        if entries is None:
            return None
        content = []
        for entry in entries:
            text, raw = self.token(entry["id"])
            top = [schema.TopLogprob(token=self.token(i)[0], logprob=lp, bytes=self.token(i)[1])
                   for i, lp in entry["top"]]
            content.append(schema.TokenLogprob(token=text, logprob=entry["logprob"], bytes=raw, top_logprobs=top))
        return schema.ChoiceLogprobs(content=content)


class _Reply:
    def __init__(self, model: str, logprobs: _Logprobs | None = None):
        self.id, self.created, self.model = schema.completion_id(), schema.now(), model
        self.logprobs = logprobs
        # Content chunks are most of a stream: render the schema once, splice each piece in.
        marker = "\u0000"
        template = self.chunk(schema.Delta(content=marker))
        self._content_head, self._content_tail = template.split(json.dumps(marker))

    def content(self, text: str, index: int = 0, logprobs: list[dict] | None = None) -> str:
        if index or logprobs:
            return self.chunk(schema.Delta(content=text), index=index, logprobs=logprobs)
        return self._content_head + json.dumps(text, ensure_ascii=False) + self._content_tail

    def chunk(self, delta: schema.Delta | None = None, finish: str | None = None,
              usage: schema.Usage | None = None, index: int = 0, logprobs: list[dict] | None = None) -> str:
        choices = [] if delta is None else [schema.ChunkChoice(
            index=index, delta=delta, finish_reason=finish,
            logprobs=self.logprobs.chat(logprobs) if self.logprobs and logprobs else None)]
        chunk = schema.ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                           choices=choices, usage=usage).model_dump(exclude_none=False)
        for choice in chunk["choices"]:  # a delta carries only what changed, as OpenAI's do
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            if choice["delta"].get("tool_calls"):
                choice["delta"]["tool_calls"] = [{k: v for k, v in c.items() if v is not None}
                                                 for c in choice["delta"]["tool_calls"]]
        return f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> schema.Usage:
    return schema.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _error_data(event: Event) -> str:
    prefix = "" if event.error_type == "invalid_request_error" else "Generation failed: "
    body = {"error": {"message": f"{prefix}{event.error or 'unknown error'}", "type": event.error_type,
                      "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\n"


async def _merged(choices: list[_Choice]) -> AsyncIterator[tuple[int, Event]]:
    """Every choice's events as they come, tagged with the choice's index, until all have finished."""
    if len(choices) == 1:
        while True:
            event = await choices[0].events.get()
            yield 0, event
            if event.finish_reason is not None:
                return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, choice: _Choice):
        while True:
            event = await choice.events.get()
            await merged.put((i, event))
            if event.finish_reason is not None:
                return
    tasks = [asyncio.ensure_future(pump(i, c)) for i, c in enumerate(choices)]
    try:
        left = len(choices)
        while left:
            i, event = await merged.get()
            left -= event.finish_reason is not None
            yield i, event
    finally:
        for task in tasks:
            task.cancel()


def _tool_call_delta(i: int, call) -> schema.Delta:
    return schema.Delta(tool_calls=[schema.DeltaToolCall(
        index=i, id=call.id, type="function", function={"name": call.name, "arguments": call.arguments})])


async def _sse(reply: _Reply, choices: list[_Choice], parsers: list, include_usage: bool,
               watcher: asyncio.Task) -> AsyncIterator[str]:
    prompt_tokens, completion_tokens = len(choices[0].request.prompt_ids), 0
    calls = [0] * len(choices)
    try:
        for i in range(len(choices)):
            yield reply.chunk(schema.Delta(role="assistant", content=""), index=i)
        async for i, event in _merged(choices):
            parser = parsers[i]
            pieces = [(event.text, [])]
            if parser is not None:
                text, done = parser.feed(event.text) if event.text else ("", [])
                if event.finish_reason is not None:
                    rest, more = parser.finish()
                    text, done = text + rest, done + more
                pieces = [(text, done)]
            for text, done in pieces:
                if text or (event.logprobs and parser is None):
                    yield reply.content(text, i, event.logprobs)
                for call in done:
                    yield reply.chunk(_tool_call_delta(calls[i], call), index=i)
                    calls[i] += 1
            if event.finish_reason is None:
                continue
            if event.finish_reason == "error":
                yield _error_data(event)
                for choice in choices:
                    choice.request.cancel.set()
                break
            completion_tokens += event.completion_tokens
            finish = "tool_calls" if calls[i] else ("length" if event.finish_reason == "length" else "stop")
            yield reply.chunk(schema.Delta(), finish=finish, index=i)
        else:
            if include_usage:
                yield reply.chunk(usage=_usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        # Client gone (the generator is closed or cancelled) or reply done: free the slots either way.
        watcher.cancel()
        for choice in choices:
            choice.request.cancel.set()


def _chat_failure(event: Event, status: int) -> str:
    return f"{'' if status == 400 else 'Generation failed: '}{event.error}"


async def _complete(reply: _Reply, choices: list[_Choice], parsers: list, watcher: asyncio.Task):
    collected = await _collect(choices, watcher, _chat_failure)
    if collected is None:
        return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
    finals = {i: event for i, (_text, _entries, event) in enumerate(collected)}
    out = []
    for i, (text, logprobs_i, event) in enumerate(collected):
        calls = []
        if parsers[i] is not None:
            shown, calls = parsers[i].feed(text)
            rest, more = parsers[i].finish()
            text, calls = shown + rest, calls + more
        finish = "tool_calls" if calls else ("length" if event.finish_reason == "length" else "stop")
        message = schema.ResponseMessage(
            content=text if text or not calls else None,
            tool_calls=[schema.ResponseToolCall(id=c.id, function=schema.FunctionCall(name=c.name, arguments=c.arguments))
                        for c in calls] or None)
        out.append(schema.Choice(index=i, message=message, finish_reason=finish,
                                 logprobs=reply.logprobs.chat(logprobs_i) if reply.logprobs else None))
    usage = _usage(finals[0].prompt_tokens, sum(e.completion_tokens for e in finals.values()))
    body = schema.ChatCompletion(id=reply.id, created=reply.created, model=reply.model, choices=out,
                                 usage=usage).model_dump()
    for choice in body["choices"]:
        if choice["message"]["tool_calls"] is None:
            del choice["message"]["tool_calls"]
    return body


# ---- /v1/completions --------------------------------------------------------------------------

async def _plain_completion(served: ServedModel, body: schema.CompletionRequest, http_request: Request):
    tokenizer = served.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            if len(prompt) > served.context_window * _longest_piece(tokenizer):
                raise _too_long(served, f"more than {served.context_window}", "prompt")
            ids = ([bos] if bos is not None else []) + await run_in_threadpool(
                encode_text, tokenizer, prompt, at_start=True)
        else:
            if any(t < 0 or t >= served.vocab_size for t in prompt):
                raise APIError(400, f"The prompt has token ids outside 0..{served.vocab_size - 1}.", param="prompt")
            ids = list(prompt)
        if len(ids) >= served.context_window:
            raise _too_long(served, len(ids), "prompt")
        prompts.append(ids)
    wants_logprobs = body.logprobs is not None
    lp = _Logprobs(tokenizer)
    out, prompt_total, completion_total = [], 0, 0
    for ids in prompts:
        scored = await _score(served, ids, body.logprobs or 0) if body.echo and wants_logprobs else None
        if body.max_tokens == 0:
            generated = [("", None, 0, "length")]
        else:
            params = _params(served, body, len(ids), logprobs=body.logprobs)
            choices = _submit_all(served, ids, params, body.n)
            watcher = _watch_disconnect(http_request, served, choices)
            collected = await _collect(choices, watcher)
            if collected is None:
                return JSONResponse({}, status_code=499)
            generated = [(text, entries, event.completion_tokens, event.finish_reason)
                         for text, entries, event in collected]
        prompt_total += len(ids)
        for text, entries, count, finish in generated:
            completion_total += count
            full = (tokenizer.decode(ids, skip_special_tokens=True) + text) if body.echo else text
            logprobs = None
            if wants_logprobs:
                pairs = ([(i, s) for i, s in zip(ids, scored)] if scored is not None else []) + [
                    (e["id"], e) for e in entries or []]
                logprobs = _completion_logprobs(lp, pairs)
            out.append(schema.CompletionChoice(index=len(out), text=full, logprobs=logprobs,
                                               finish_reason="length" if finish == "length" else "stop"))
    return schema.Completion(id=schema.completion_id().replace("chatcmpl", "cmpl"), created=schema.now(),
                             model=served.id, choices=out,
                             usage=_usage(prompt_total, completion_total)).model_dump()


async def _score(served: ServedModel, ids: list[int], top: int) -> list[dict | None]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def on_done(result, error):
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result((result, error)))
    try:
        served.scheduler.score(ids, top, on_done)
    except ShuttingDown:
        raise APIError(503, "The server is shutting down; retry against its next start.",
                       "server_shutting_down", code="shutting_down") from None
    result, error = await done
    if error is not None:
        raise APIError(500, f"Scoring the prompt failed: {error}", "server_error")
    return result


def _plain_failure(event: Event, status: int) -> str:
    return event.error or "generation failed"


async def _collect(choices: list[_Choice], watcher: asyncio.Task, failure=_plain_failure):
    """Every choice's (text, logprob entries, final event), in choice order; None when the client left.
    A failed choice raises APIError with `failure(event, status)` as its message."""
    texts = [[] for _ in choices]
    entries = [[] for _ in choices]
    finals: dict[int, Event] = {}
    try:
        async for i, event in _merged(choices):
            texts[i].append(event.text)
            entries[i] += event.logprobs or []
            if event.finish_reason == "cancelled":
                return None
            if event.finish_reason == "error":
                status = ERROR_STATUS.get(event.error_type, 500)
                raise APIError(status, failure(event, status), event.error_type)
            if event.finish_reason is not None:
                finals[i] = event
    finally:
        watcher.cancel()
        for choice in choices:
            choice.request.cancel.set()
    return [("".join(texts[i]), entries[i], finals[i]) for i in sorted(finals)]


def _completion_logprobs(lp: _Logprobs, pairs: list[tuple[int, dict | None]]) -> schema.CompletionLogprobs:
    tokens, token_logprobs, top, offsets = [], [], [], []
    at = 0
    for token_id, entry in pairs:
        text = lp.token(token_id)[0]
        text = lp.tokenizer.decode([token_id]) if text.startswith("<0x") else text
        tokens.append(text)
        offsets.append(at)
        at += len(text)
        token_logprobs.append(None if entry is None else entry["logprob"])
        top.append(None if entry is None else {lp.token(i)[0]: v for i, v in entry["top"]})
    return schema.CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top,
                                     text_offset=offsets)
