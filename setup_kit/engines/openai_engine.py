"""The `openai` engine: any OpenAI-compatible server (LMDeploy's api_server, vLLM,
`transformers serve`, `internlm-kit serve`) streamed over server-sent events.

The HTTP is read on a helper thread so that Ctrl-C (the cancel event) is honoured at once even
while the server is silent, and a server that goes away mid-reply becomes a clear error after
the text that did arrive. Tool calls in a reply (OpenAI's `tool_calls` deltas, streamed in pieces)
are gathered into `last_tool_calls`, for the REPL to show; the chat itself runs no tools.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator

from setup_kit.engines.base import GenerationParams, GenerationStats, Message
from setup_kit.errors import ChatError, ContextOverflow, KitError, UsageError

# Used when the server does not say: InternLM2's trained context.
DEFAULT_CONTEXT_WINDOW = 32768
SERVER_HINT = ("Start one (`internlm-kit serve`, `lmdeploy serve api_server MODEL`, "
               "`vllm serve MODEL`, `transformers serve MODEL`) or check --endpoint.")
_END = object()


def require_httpx() -> None:
    """httpx comes with the chat and serve extras (huggingface_hub's, uvicorn's client side), not
    with `pip install internlm-kit` alone: say what to install instead of an ImportError."""
    import importlib.util
    import sys

    if importlib.util.find_spec("httpx") is None:
        from setup_kit.checks.fixes import pip_install

        raise KitError(f"chat --endpoint needs httpx, which this Python environment ({sys.executable}) "
                       "does not have (it comes with the kit's `chat` and `serve` extras).",
                       f"{pip_install(sys.executable, ['httpx'])} (or pip install 'internlm-kit[chat]')")


def normalize_endpoint(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all mean the same API."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--endpoint {url!r} is not an http(s) URL.",
                         fix="For example: --endpoint http://127.0.0.1:8000/v1")
    require_httpx()
    import httpx

    try:
        httpx.URL(url)
    except httpx.InvalidURL as exc:  # not an HTTPError: checked here, before any request
        raise UsageError(f"--endpoint {url!r} is not a valid URL ({exc}).",
                         fix="For example: --endpoint http://127.0.0.1:8000/v1 (host, then a numeric port)") from None
    for suffix in ("/chat/completions", "/models"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url if url.endswith("/v1") else url + "/v1"


class OpenAIEngine:
    name = "openai"

    def __init__(self, endpoint: str, model: str | None = None, api_key: str | None = None,
                 *, connect_timeout: float = 10.0, context_window: int | None = None,
                 tools: list[dict] | None = None):
        self.base_url = normalize_endpoint(endpoint)  # says what to install when httpx is missing
        import httpx

        self.tools = tools  # OpenAI tool specs offered with every request (the chat command offers none)
        self.last_tool_calls: list[dict] = []  # the last reply's calls: {"id", "name", "arguments"}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout: a big model may think for a while before its first token.
        self._client = httpx.Client(headers=headers,
                                    timeout=httpx.Timeout(connect_timeout, read=None))
        self._stats = GenerationStats()
        self._chars_per_token = 3.0  # refined from the server's usage reports
        listed = self._list_models()
        self.model = model or (listed[0]["id"] if listed else None)
        if self.model is None:
            raise KitError(f"The server at {self.base_url} lists no models.",
                           fix="Name the model with --model NAME.")
        info = next((m for m in listed if m.get("id") == self.model), {})
        # vLLM reports max_model_len, `internlm-kit serve` context_window.
        self.context_window = int(context_window or info.get("max_model_len")
                                  or info.get("context_length") or info.get("context_window")
                                  or DEFAULT_CONTEXT_WINDOW)

    # -- Engine -----------------------------------------------------------------------------

    def describe(self) -> str:
        return f"openai engine, model {self.model} at {self.base_url}"

    @property
    def last_stats(self) -> GenerationStats:
        return self._stats

    def count_prompt_tokens(self, messages: list[Message]) -> int:
        """An estimate (the tokenizer lives on the server), calibrated by its usage reports."""
        chars = sum(len(m["content"]) + 16 for m in messages)  # + the template's tokens per turn
        return int(chars / self._chars_per_token) + 4

    def stream(self, messages: list[Message], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[str]:
        cancel = cancel or threading.Event()
        stats = GenerationStats(stop="eos")
        self._stats = stats
        calls: dict[int, dict] = {}
        self.last_tool_calls = []
        started = time.perf_counter()
        pieces: queue.Queue = queue.Queue()
        response_box: list = []
        reader = threading.Thread(target=self._read, args=(self._body(messages, params), pieces,
                                                           response_box), daemon=True)
        reader.start()
        chunks = 0
        try:
            while True:
                try:
                    item = pieces.get(timeout=0.05)
                except queue.Empty:
                    if cancel.is_set():
                        stats.stop = "interrupt"
                        break
                    continue
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                kind, value = item
                if kind == "text":
                    chunks += 1
                    if chunks == 1:
                        stats.first_token_seconds = time.perf_counter() - started
                    yield value
                    if cancel.is_set():
                        stats.stop = "interrupt"
                        break
                elif kind == "tool_call":  # pieces of a call, by index: name first, arguments in parts
                    call = calls.setdefault(value.get("index", len(calls)), {"id": "", "name": "", "arguments": ""})
                    function = value.get("function") or {}
                    call["id"] = value.get("id") or call["id"]
                    call["name"] += function.get("name") or ""
                    call["arguments"] += function.get("arguments") or ""
                    self.last_tool_calls = [calls[i] for i in sorted(calls)]
                elif kind == "finish":
                    stats.stop = "length" if value == "length" else "eos"
                elif kind == "usage":
                    stats.prompt_tokens = int(value.get("prompt_tokens") or 0)
                    stats.completion_tokens = int(value.get("completion_tokens") or 0)
        finally:
            if response_box:  # stop the server's work: closing the stream aborts the request
                try:
                    response_box[0].close()
                except Exception:  # noqa: BLE001 - the reader thread may be mid-read
                    pass
            stats.seconds = time.perf_counter() - started
            if not stats.completion_tokens:
                stats.completion_tokens = chunks
            if not stats.prompt_tokens:
                stats.prompt_tokens = self.count_prompt_tokens(messages)
            else:
                chars = sum(len(m["content"]) + 16 for m in messages)
                self._chars_per_token = max(1.0, chars / max(stats.prompt_tokens, 1))

    def close(self) -> None:
        self._client.close()

    # -- HTTP -------------------------------------------------------------------------------

    def _body(self, messages: list[Message], params: GenerationParams) -> dict:
        body = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if self.tools:
            body["tools"] = self.tools
        return body

    def _list_models(self) -> list[dict]:
        import httpx

        try:
            response = self._client.get(f"{self.base_url}/models")
        except httpx.HTTPError as exc:
            raise KitError(f"Could not reach an OpenAI-compatible server at {self.base_url}: "
                           f"{_describe(exc)}.", fix=SERVER_HINT) from None
        if response.status_code == 401:
            raise KitError(f"The server at {self.base_url} refused the API key (401).",
                           fix="Pass the right key with --api-key or OPENAI_API_KEY.")
        if response.status_code != 200:
            raise KitError(f"{self.base_url}/models answered HTTP {response.status_code}; "
                           "is this an OpenAI-compatible API?",
                           fix="Point --endpoint at the server's /v1 base URL.")
        try:
            return list(response.json().get("data") or [])
        except (ValueError, AttributeError):
            raise KitError(f"{self.base_url}/models did not answer with the OpenAI model list.",
                           fix="Point --endpoint at the server's /v1 base URL.") from None

    def _read(self, body: dict, out: queue.Queue, response_box: list) -> None:
        """Helper thread: POST, then put ("text"|"finish"|"usage", value) items, then _END."""
        import httpx

        url = f"{self.base_url}/chat/completions"
        got_text = False
        try:
            with self._client.stream("POST", url, json=body) as response:
                response_box.append(response)
                if response.status_code != 200:
                    response.read()
                    refusal = (f"The server at {self.base_url} refused the request: HTTP "
                               f"{response.status_code}: {_error_text(response)}")
                    if response.status_code == 400 and _is_context_overflow(response.text):
                        raise ContextOverflow(refusal)
                    raise ChatError(refusal,
                                    fix="Check the model name (--model) and the generation "
                                        "options (--max-new-tokens, --temperature, --top-p), "
                                        "or the server's log.",
                                    chat_fix="Check the model name (--model) and the settings "
                                             "(/set), or the server's log.")
                finished = False
                for event in _sse_events(response.iter_lines()):
                    if event == "[DONE]":
                        break
                    for kind, value in _chunk_items(event):
                        got_text = got_text or kind == "text"
                        finished = finished or kind == "finish"
                        out.put((kind, value))
                else:
                    if not finished:  # no [DONE] and no finish_reason: cut off, not ended
                        raise httpx.RemoteProtocolError("the stream ended before the reply did")
        except KitError as exc:
            out.put(exc)
        except (httpx.HTTPError, OSError) as exc:
            # (after Ctrl-C we close the stream ourselves; nobody reads this error then)
            where = "in the middle of the reply" if got_text else "before it replied"
            out.put(KitError(f"The server at {self.base_url} went away {where} "
                             f"({_describe(exc)}).",
                             fix="The text that arrived is kept in the history. Restart the "
                                 "server, then ask again."))
        finally:
            out.put(_END)


def _sse_events(lines) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream (multi-line data joined)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
            if data == ["[DONE]"]:
                yield "[DONE]"
                return
    if data:
        yield "\n".join(data)


def _chunk_items(event: str):
    try:
        chunk = json.loads(event)
    except json.JSONDecodeError:
        raise KitError(f"The server sent something that is not a JSON chunk: {event[:200]!r}",
                       fix="Check that --endpoint is an OpenAI-compatible API.") from None
    if not isinstance(chunk, dict):
        return
    if "error" in chunk:
        err = chunk["error"]
        message = err.get("message") if isinstance(err, dict) else str(err)
        raise KitError(f"The server reported an error mid-reply: {message}",
                       fix="The text that arrived is kept in the history; check the server's log.")
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if content:
            yield "text", content
        for call in delta.get("tool_calls") or []:
            if isinstance(call, dict):
                yield "tool_call", call
        if choice.get("finish_reason"):
            yield "finish", choice["finish_reason"]
    if chunk.get("usage"):
        yield "usage", chunk["usage"]


def _error_text(response) -> str:
    try:
        data = response.json()
        err = data.get("error", data.get("detail", data))
        return (err.get("message") if isinstance(err, dict) else str(err))[:300]
    except Exception:  # noqa: BLE001 - any body at all is better than none
        return response.text[:300]


def _is_context_overflow(body: str) -> bool:
    """OpenAI's and vLLM's "maximum context length", OpenAI's and `internlm-kit serve`'s
    context_length_exceeded code."""
    body = body.lower()
    return "context_length_exceeded" in body or "maximum context length" in body


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.rstrip(".")
