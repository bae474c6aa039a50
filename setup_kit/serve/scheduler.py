"""Continuous batching: one engine thread steps every active request together.

Requests are slots in one left-padded batch. Each loop the engine thread admits waiting requests
(prefilled together in one pass, then merged into the batch, right-aligned), runs one decode step for every slot at once, hands each slot its token, and drops
the slots that finished or whose client left, at once. Rows keep their own positions, and a 4D mask
hides each row's padding, so a greedy answer does not depend on what else is in the batch (beyond
float rounding of different matrix shapes).

The KV cache is a grown-in-place buffer rather than transformers' DynamicCache, which concatenates
the whole cache on every step (a copy that grows with batch and length and dominates on CPU).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from setup_kit.decoding import IncrementalDecoder
from setup_kit.engines import compat
from setup_kit.stop_strings import StopStrings

log = logging.getLogger("internlm_kit.serve")

GATHER_SECONDS = 0.01  # the longest gap between arrivals that still counts as together
GATHER_MAX_SECONDS = 0.06  # the longest a first request waits for company

FinishReason = str  # "stop" | "length" | "cancelled" | "error"


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full."""


class ShuttingDown(Exception):
    """The server is stopping: no new requests are admitted."""


GREEDY_BELOW = 1e-4  # a temperature this close to 0 is argmax (its limit), not a sampling step
SEED_SPACE = 1 << 64  # torch generators take seeds in [0, 2**64)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.8
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k
    special_text: bool = False  # show special tokens as text (tool-call markup is parsed from it)
    grammar: object | None = None  # response_format's grammar (serve.grammar.JsonGrammar): .matcher()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class Event:
    """What the engine thread tells a request's consumer: text, and at the end a finish reason."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_type: str = "server_error"  # "invalid_request_error": the request's own parameters caused it
    token_ids: list[int] | None = None  # on the finishing event: every generated token, for tests/logs
    logprobs: list[dict] | None = None  # per token since the last event: token id, logprob, top [(id, lp)]


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # thread-safe callback, called from the engine thread
    cancel: threading.Event = field(default_factory=threading.Event)
    id: int = 0


class _Slot:
    """One active request inside the batch."""

    def __init__(self, request: Request, tokenizer, eos_ids: set[int], device):
        import torch

        self.request = request
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=not request.params.special_text)
        self.eos_ids = eos_ids
        self.position = len(request.prompt_ids)  # position id of the next token fed in
        self.generated: list[int] = []
        self.counts: dict[int, int] = {}  # generated token -> times, for the repetition penalties
        self.stops = StopStrings(request.params.stop)
        self.logprobs: list[dict] = []  # entries not yet sent with an event
        self.done = False
        # This request's own place in its grammar: masks its row of logits only, dropped with the slot.
        self.matcher = request.params.grammar.matcher() if request.params.grammar is not None else None
        self.generator = None
        if not request.params.greedy:
            self.generator = torch.Generator(device=device)
            seed = request.params.seed
            # Without a seed, a fresh one (torch.seed() would also reseed the process's global RNG).
            self.generator.manual_seed(seed % SEED_SPACE if seed is not None else secrets.randbits(63))

    def accept(self, token: int, logprob: dict | None = None) -> None:
        """Take one generated token: emit safe text, decide whether this request is done."""
        req = self.request
        if token in self.eos_ids:
            self._finish("stop")
            return
        self.generated.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if logprob is not None:
            self.logprobs.append(logprob)
        self.position += 1
        text, hit = self.stops.feed(self.decoder.push(token))
        if hit:
            self._send(text)
            self._finish("stop", flush=False)
            return
        self._send(text)
        if len(self.generated) >= req.params.max_tokens:
            self._finish("length")

    def _send(self, text: str) -> None:
        if text:
            sent, self.logprobs = self.logprobs or None, []
            self.request.emit(Event(text=text, logprobs=sent))

    def _finish(self, reason: FinishReason, *, flush: bool = True) -> None:
        if flush:
            text, hit = self.stops.feed(self.decoder.flush())
            if not hit:
                rest, hit = self.stops.flush()
                text += rest
            self._send(text)
            reason = "stop" if hit else reason  # a stop string turned up in the flushed tail
        self.done = True
        self.request.emit(Event(finish_reason=reason, prompt_tokens=len(self.request.prompt_ids),
                                completion_tokens=len(self.generated), token_ids=list(self.generated),
                                logprobs=self.logprobs or None))

    def cancel(self) -> None:
        self.done = True
        self.request.emit(Event(finish_reason="cancelled", prompt_tokens=len(self.request.prompt_ids),
                                completion_tokens=len(self.generated)))

    def fail(self, message: str, error_type: str = "server_error") -> None:
        """This request alone ends with an error; the batch goes on without it."""
        self.done = True
        self.request.emit(Event(finish_reason="error", error=message, error_type=error_type,
                                prompt_tokens=len(self.request.prompt_ids),
                                completion_tokens=len(self.generated)))


class _GrowingLayer:
    """One layer's K/V for the whole batch: [batch, kv_heads, capacity, head_dim], filled to `length`."""

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def __init__(self, keys, values, length: int):
        self.keys_buf, self.values_buf, self.length = keys, values, length

    def update(self, key_states, value_states, *args, **kwargs):
        import torch

        new = key_states.shape[-2]
        end = self.length + new
        if end > self.keys_buf.shape[-2]:
            grow = max(end, 2 * self.keys_buf.shape[-2])
            self.keys_buf = _resize(self.keys_buf, grow, torch)
            self.values_buf = _resize(self.values_buf, grow, torch)
        self.keys_buf[:, :, self.length:end] = key_states
        self.values_buf[:, :, self.length:end] = value_states
        self.length = end
        return self.keys_buf[:, :, :end], self.values_buf[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int):
        return self.length + query_length, 0


def _resize(buf, capacity: int, torch):
    out = buf.new_zeros(buf.shape[0], buf.shape[1], capacity, buf.shape[3])
    n = min(capacity, buf.shape[2])
    out[:, :, :n] = buf[:, :, :n]
    return out




class BatchScheduler:
    """Owns the model; `submit` from any thread, events come back through each request's `emit`."""

    def __init__(self, model, tokenizer, *, eos_ids: set[int], max_batch: int = 8, max_queue: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_window = int(getattr(model.config, "max_position_embeddings", 4096))
        self._waiting: deque[Request] = deque()  # submitted, not yet admitted
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._active: list[_Slot] = []
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._jobs: deque[_ScoreJob] = deque()  # prompt scoring (/v1/completions echo), engine thread
        self._thread: threading.Thread | None = None
        # Batch state (engine thread only).
        self._layers: list[_GrowingLayer] = []
        self._mask = None  # [batch, length] bool: which cache columns are real tokens
        self._dense = False  # every column of every row real (no padding): decode needs no mask
        self._next_tokens: list[int] = []

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="internlm-kit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def close(self) -> None:
        """Shutting down: admit nothing more, end every running and waiting request now (with an
        error event each, so every stream gets its last words), keep the thread for `stop`."""
        self._closing.set()
        # May run in a signal handler, which must not wait for a lock the interrupted code holds:
        # the engine thread is woken from a thread of its own.
        threading.Thread(target=self._notify, name="internlm-kit-close", daemon=True).start()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    @property
    def load(self) -> dict:
        with self._lock:
            return {"active": len(self._active), "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue}

    def submit(self, request: Request) -> Request:
        # The last token fed back must still have a position inside the context window.
        room = self.context_window - len(request.prompt_ids)
        request.params.max_tokens = max(1, min(request.params.max_tokens, room))
        with self._wake:
            if self._closing.is_set() or self._stop.is_set():
                raise ShuttingDown()
            free = self.max_batch - len(self._active)
            if len(self._waiting) - free >= self.max_queue:
                raise QueueFull()
            request.id = next(self._ids)
            self._waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """The client left: a waiting request gives up its place at once, a running one within a step."""
        request.cancel.set()
        with self._lock:
            try:
                self._waiting.remove(request)
            except ValueError:
                return  # admitted already (the engine thread drops it) or finished
        request.emit(Event(finish_reason="cancelled", prompt_tokens=len(request.prompt_ids)))

    def score(self, prompt_ids: list[int], top: int, on_done: Callable) -> None:
        """Log-probabilities of each prompt token given the ones before it (and the `top` likeliest
        there), computed on the engine thread between decode steps; `on_done(result, error)`."""
        with self._wake:
            if self._closing.is_set() or self._stop.is_set():
                raise ShuttingDown()
            self._jobs.append(_ScoreJob(prompt_ids, top, on_done))
            self._wake.notify()

    def _run_jobs(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            try:
                job.on_done(_score(self.model, job.prompt_ids, job.top), None)
            except Exception as exc:  # this job's failure alone
                log.exception("scoring failed")
                job.fail(f"{type(exc).__name__}: {exc}")

    def _next_waiting(self, wait: float | None) -> Request | None:
        """The first waiting request, waiting up to `wait` seconds for one (None: do not wait)."""
        with self._wake:
            if wait is not None and not self._waiting:
                self._wake.wait_for(lambda: self._waiting or self._jobs or self._stop.is_set()
                                    or self._closing.is_set(), timeout=wait)
            if self._stop.is_set() or self._closing.is_set() or not self._waiting:
                return None
            return self._waiting.popleft()

    # ---- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                if self._closing.is_set():
                    self._fail_all("the server is shutting down", "server_shutting_down")
                    with self._wake:
                        self._wake.wait_for(self._stop.is_set, timeout=0.5)
                    continue
                try:
                    self._run_jobs()
                    self._admit(block=not self._active)
                    if self._stop.is_set():
                        break
                    self._drop_finished()
                    if self._active:
                        self._decode_step()
                        self._drop_finished()
                except Exception as exc:  # a bug must not wedge the server: fail the batch, go on
                    log.exception("decode step failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
        self._fail_all("the server is shutting down")

    def _admit(self, *, block: bool) -> None:
        """Take waiting requests into the free slots and prefill them together."""
        joining: list[Request] = []
        # Woken from idle: clients that connect together arrive some ms apart (HTTP parsing and
        # tokenizing sit between them); waiting while they keep coming, up to GATHER_MAX_SECONDS,
        # lets them share one prefill instead of queueing behind each other's.
        gather_until = None
        while len(self._active) + len(joining) < self.max_batch:
            if block:
                wait = 0.5
            elif gather_until is not None:
                wait = min(GATHER_SECONDS, gather_until - time.monotonic())
            else:
                wait = None
            if wait is not None and wait <= 0:
                break
            request = self._next_waiting(wait)
            if request is None:  # nobody came, or stop()/close() woke us
                break
            if block:
                gather_until = time.monotonic() + GATHER_MAX_SECONDS
            block = False
            if request.cancel.is_set():
                request.emit(Event(finish_reason="cancelled", prompt_tokens=len(request.prompt_ids)))
                continue
            joining.append(request)
        if not joining:
            return
        try:
            self._prefill(joining)
        except Exception as exc:  # these requests' failure, not the running batch's
            log.exception("prefill failed")
            for request in joining:
                request.emit(Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}",
                                   prompt_tokens=len(request.prompt_ids)))

    def _prefill(self, requests: list[Request]) -> None:
        """Run the joining prompts in one forward, take their first tokens, merge them into the batch.

        A lone prompt runs unpadded, exactly as a one-request generate would. Several are left-padded
        to one width with a 4D mask that hides the padding (padding rows attend only to themselves,
        which keeps their throwaway values finite) and positions that skip it: one pass instead of one
        per prompt is what keeps the time to first token low when many clients arrive at once.
        """
        import torch

        device = self.model.device
        slots = [_Slot(r, self.tokenizer, self.eos_ids, device) for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long, device=device)
        real = torch.zeros(len(requests), width, dtype=torch.bool, device=device)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, device=device)
            real[i, width - len(r.prompt_ids):] = True
        cache = compat.new_cache(self.model)
        if len(requests) == 1:
            logits, cache = compat.forward(self.model, ids, cache)
        else:
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            attention = (causal[None, None] & real[:, None, None, :]) | torch.eye(
                width, dtype=torch.bool, device=device)
            logits, cache = compat.forward(self.model, ids, cache, position_ids=positions, attention_mask=attention)
        tokens = self._sample(logits, slots)
        kv = compat.layer_tensors(cache)
        with self._lock:
            self._merge(slots, kv, real, [0 if t is None else t[0] for t in tokens])
        for slot, token in zip(slots, tokens):
            if token is not None:
                slot.accept(*token)

    def _merge(self, slots: list[_Slot], kv, real, tokens: list[int]) -> None:
        """Append prefilled rows to the batch, everything right-aligned on the newest column."""
        import torch

        old_rows = len(self._active)
        old_len = self._mask.shape[1] if old_rows else 0
        length = real.shape[1]
        new_len = max(old_len, length)
        batch = old_rows + len(slots)
        layers = []
        for i, (k, v) in enumerate(kv):
            shape = (batch, k.shape[1], new_len + 64, k.shape[3])
            keys, values = k.new_zeros(shape), v.new_zeros(shape)
            if old_rows:
                old = self._layers[i]
                keys[:old_rows, :, new_len - old_len:new_len] = old.keys_buf[:, :, :old_len]
                values[:old_rows, :, new_len - old_len:new_len] = old.values_buf[:, :, :old_len]
            keys[old_rows:, :, new_len - length:new_len] = k
            values[old_rows:, :, new_len - length:new_len] = v
            layers.append(_GrowingLayer(keys, values, new_len))
        mask = torch.zeros(batch, new_len, dtype=torch.bool, device=real.device)
        if old_rows:
            mask[:old_rows, new_len - old_len:] = self._mask
        mask[old_rows:, new_len - length:] = real
        self._layers, self._mask = layers, mask
        self._dense = bool(mask.all())
        self._active.extend(slots)
        self._next_tokens.extend(tokens)

    def _decode_step(self) -> None:
        import torch

        device = self.model.device
        slots = self._active
        ids = torch.tensor(self._next_tokens, device=device).unsqueeze(1)
        positions = torch.tensor([s.position - 1 for s in slots], device=device).unsqueeze(1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(slots), 1)], dim=1)
        # Without padding the model's own causal handling is the mask; on 4.38-4.46 an explicit one
        # costs a mask conversion per layer and step (0.93x bare generate at one client, not 0.98x).
        dense = self._dense and compat.layer_cache_masks_itself()
        attention = None if dense else self._mask[:, None, None, :]
        logits, _ = compat.forward(self.model, ids, compat.cache_of_layers(self._layers),
                                   position_ids=positions, attention_mask=attention)
        tokens = self._sample(logits, slots)
        for i, (slot, token) in enumerate(zip(slots, tokens)):
            if slot.done:  # failed alone in sampling
                continue
            if slot.request.cancel.is_set():
                slot.cancel()
                continue
            self._next_tokens[i] = token[0]
            slot.accept(*token)

    def _sample(self, logits, slots: list[_Slot]) -> list[tuple[int, dict | None] | None]:
        """Each slot's next token (and its log-probabilities when asked), by its own parameters.

        A row whose numbers are not finite fails that request alone (None in its place): one
        request's parameters or one bad row must never take its batch-mates down with it.
        """
        import torch

        logits = logits.float()
        for i, slot in enumerate(slots):
            _adjust(logits, i, slot)
        finite = torch.isfinite(logits).all(dim=-1)
        for i, slot in enumerate(slots):  # after the check: a grammar's mask is -inf on purpose
            if slot.matcher is not None:
                slot.matcher.mask(logits, i)
        best = torch.argmax(logits, dim=-1)
        tokens: list[tuple[int, dict | None] | None] = []
        for i, (ok, token, slot) in enumerate(zip(finite.tolist(), best.tolist(), slots)):
            if not ok:
                log.warning("request %s: the model gave non-finite logits; failing it alone", slot.request.id)
                slot.fail("the model produced non-finite scores (NaN or infinity) for this request")
                tokens.append(None)
                continue
            p = slot.request.params
            if not p.greedy:
                token = _draw(logits[i], p, slot.generator)
                if token is None:
                    slot.fail("these sampling parameters left no token to choose from "
                              f"(temperature {p.temperature}, top_p {p.top_p})", "invalid_request_error")
                    tokens.append(None)
                    continue
            if slot.matcher is not None and not slot.matcher.accept(token):
                log.error("request %s: token %s is outside its grammar; failing it alone", slot.request.id, token)
                slot.fail(f"constrained decoding chose token {token}, which its grammar does not allow")
                tokens.append(None)
                continue
            tokens.append((token, _logprob_entry(logits[i], token, p.logprobs)))
        return tokens

    def _drop_finished(self) -> None:
        for slot in self._active:
            if not slot.done and slot.request.cancel.is_set():
                slot.cancel()
        keep = [i for i, s in enumerate(self._active) if not s.done]
        if len(keep) == len(self._active):
            return
        with self._lock:
            self._active = [self._active[i] for i in keep]
            self._next_tokens = [self._next_tokens[i] for i in keep]
            if not keep:
                self._layers, self._mask = [], None
                return
            import torch

            index = torch.tensor(keep, device=self._mask.device)
            mask = self._mask[index]
            # Columns that are padding in every remaining row are dead weight: cut them off.
            real = mask.any(dim=0).nonzero()
            start = int(real[0]) if len(real) else mask.shape[1]
            self._mask = mask[:, start:]
            self._dense = bool(self._mask.all())
            for layer in self._layers:
                n = layer.length
                layer.keys_buf = layer.keys_buf[index, :, start:n].contiguous()
                layer.values_buf = layer.values_buf[index, :, start:n].contiguous()
                layer.length = n - start
                layer.keys_buf = _resize(layer.keys_buf, layer.length + 64, torch)
                layer.values_buf = _resize(layer.values_buf, layer.length + 64, torch)

    def _fail_all(self, message: str, error_type: str = "server_error") -> None:
        with self._lock:
            slots, self._active, self._next_tokens = self._active, [], []
            self._layers, self._mask = [], None
            waiting, self._waiting = list(self._waiting), deque()
        for slot in slots:
            if not slot.done:
                slot.fail(message, error_type)
        for request in waiting:
            request.emit(Event(finish_reason="error", error=message, error_type=error_type,
                               prompt_tokens=len(request.prompt_ids)))
        jobs, self._jobs = self._jobs, deque()
        for job in jobs:
            job.fail(message)


@dataclass
class _ScoreJob:
    prompt_ids: list[int]
    top: int
    on_done: Callable

    def fail(self, message: str) -> None:
        self.on_done(None, message)


def _score(model, prompt_ids: list[int], top: int) -> list[dict | None]:
    """One forward over the prompt: entry i scores token i given tokens < i (None for the first)."""
    import torch

    ids = torch.tensor([prompt_ids], device=model.device)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    out: list[dict | None] = [None]
    for i in range(1, len(prompt_ids)):
        out.append(_logprob_entry(logits[i - 1], prompt_ids[i], top))
    return out


def _adjust(logits, row: int, slot: _Slot) -> None:
    """OpenAI's logit_bias and frequency/presence penalties, applied in place to one row."""
    import torch

    p = slot.request.params
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits.device)
        logits[row, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
    if slot.counts and (p.frequency_penalty or p.presence_penalty):
        ids = torch.tensor(list(slot.counts), device=logits.device)
        counts = torch.tensor(list(slot.counts.values()), dtype=logits.dtype, device=logits.device)
        logits[row, ids] -= counts * p.frequency_penalty + p.presence_penalty


def _draw(row, p: SamplingParams, generator) -> int | None:
    """One token sampled from softmax(row / temperature) within top_p; None if nothing is left."""
    import torch

    # Shifting by the maximum first keeps row / temperature finite for any positive temperature
    # (9e-39 included): the best token scores 0, the rest go to -inf at worst, never NaN.
    scaled = (row - row.max()) / p.temperature
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
        keep[0] = True  # the most likely token always stays, however small top_p is
        sorted_probs = sorted_probs * keep
    else:
        sorted_probs, order = probs, None
    total = float(sorted_probs.sum())
    if not total > 0.0 or total != total or total == float("inf"):
        return None
    choice = int(torch.multinomial(sorted_probs, 1, generator=generator))
    return int(order[choice]) if order is not None else choice


def _logprob_entry(row, token: int, top: int | None) -> dict | None:
    """The chosen token's log-probability and the `top` most likely alternatives (OpenAI's logprobs)."""
    if top is None:
        return None
    import torch

    logps = torch.log_softmax(row, dim=-1)
    entry = {"id": token, "logprob": float(logps[token]), "top": []}
    if top:
        values, ids = torch.topk(logps, min(top, logps.shape[-1]))
        # Tokens a grammar ruled out score -inf: not alternatives (and not valid JSON numbers).
        entry["top"] = [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v != float("-inf")]
    return entry


def monotonic() -> float:
    return time.perf_counter()
