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
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from setup_kit.decoding import IncrementalDecoder

log = logging.getLogger("internlm_kit.serve")

GATHER_SECONDS = 0.01  # the longest gap between arrivals that still counts as together
GATHER_MAX_SECONDS = 0.06  # the longest a first request waits for company

FinishReason = str  # "stop" | "length" | "cancelled" | "error"


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.8
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Event:
    """What the engine thread tells a request's consumer: text, and at the end a finish reason."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    token_ids: list[int] | None = None  # on the finishing event: every generated token, for tests/logs


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
        self.decoder = IncrementalDecoder(tokenizer)
        self.eos_ids = eos_ids
        self.position = len(request.prompt_ids)  # position id of the next token fed in
        self.generated: list[int] = []
        self.held = ""  # text that might be the start of a stop string
        self.done = False
        self.generator = None
        if not request.params.greedy:
            self.generator = torch.Generator(device=device)
            seed = request.params.seed
            # Without a seed, a fresh one (torch.seed() would also reseed the process's global RNG).
            self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))

    def accept(self, token: int) -> None:
        """Take one generated token: emit safe text, decide whether this request is done."""
        req = self.request
        if token in self.eos_ids:
            self._finish("stop")
            return
        self.generated.append(token)
        self.position += 1
        text = self.held + self.decoder.push(token)
        self.held = ""
        if self._emit_until_stop(text):
            return
        if len(self.generated) >= req.params.max_tokens:
            self._finish("length")

    def _emit_until_stop(self, text: str) -> bool:
        stops = self.request.params.stop
        for stop in stops:
            at = text.find(stop)
            if at >= 0:
                self._send(text[:at])
                self._finish("stop", flush=False)
                return True
        # Hold back a tail that could still grow into a stop string.
        keep = 0
        for stop in stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self.held = text[len(text) - keep:] if keep else ""
        self._send(text[:len(text) - keep])
        return False

    def _send(self, text: str) -> None:
        if text:
            self.request.emit(Event(text=text))

    def _finish(self, reason: FinishReason, *, flush: bool = True) -> None:
        if flush:
            rest = self.held + self.decoder.flush()
            self.held = ""
            if rest and not self._emit_until_stop(rest):
                self._send(self.held)
            if self.done:  # a stop string turned up in the flushed tail
                return
        self.done = True
        self.request.emit(Event(finish_reason=reason, prompt_tokens=len(self.request.prompt_ids),
                                completion_tokens=len(self.generated), token_ids=list(self.generated)))

    def cancel(self) -> None:
        self.done = True
        self.request.emit(Event(finish_reason="cancelled", prompt_tokens=len(self.request.prompt_ids),
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


def _make_cache(layers):
    """A transformers Cache whose layers are ours (the model only calls update/get_seq_length)."""
    from transformers.cache_utils import Cache

    cache = Cache.__new__(Cache)
    Cache.__init__(cache, layers=layers)
    return cache


class BatchScheduler:
    """Owns the model; `submit` from any thread, events come back through each request's `emit`."""

    def __init__(self, model, tokenizer, *, eos_ids: set[int], max_batch: int = 8, max_queue: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_window = int(getattr(model.config, "max_position_embeddings", 4096))
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet admitted
        self._active: list[_Slot] = []
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Batch state (engine thread only).
        self._layers: list[_GrowingLayer] = []
        self._mask = None  # [batch, length] bool: which cache columns are real tokens
        self._next_tokens: list[int] = []

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="internlm-kit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._waiting.put(None)  # type: ignore[arg-type]
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def load(self) -> dict:
        with self._lock:
            return {"active": len(self._active), "waiting": self._pending,
                    "max_batch": self.max_batch, "max_queue": self.max_queue}

    def submit(self, request: Request) -> Request:
        # The last token fed back must still have a position inside the context window.
        room = self.context_window - len(request.prompt_ids)
        request.params.max_tokens = max(1, min(request.params.max_tokens, room))
        with self._lock:
            free = self.max_batch - len(self._active)
            if self._pending - free >= self.max_queue:
                raise QueueFull()
            self._pending += 1
        request.id = next(self._ids)
        self._waiting.put(request)
        return request

    # ---- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                try:
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
            try:
                if wait is None:
                    request = self._waiting.get_nowait()
                elif wait <= 0:
                    break
                else:
                    request = self._waiting.get(timeout=wait)
            except queue.Empty:
                break
            if request is None:  # stop() wakes us
                break
            with self._lock:
                self._pending -= 1
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
        from transformers.cache_utils import DynamicCache

        device = self.model.device
        slots = [_Slot(r, self.tokenizer, self.eos_ids, device) for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long, device=device)
        real = torch.zeros(len(requests), width, dtype=torch.bool, device=device)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, device=device)
            real[i, width - len(r.prompt_ids):] = True
        cache = DynamicCache(config=self.model.config)
        if len(requests) == 1:
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        else:
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            attention = (causal[None, None] & real[:, None, None, :]) | torch.eye(
                width, dtype=torch.bool, device=device)
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=attention, cache=cache,
                             use_cache=True, logits_to_keep=1)
        tokens = self._sample(out.logits[:, -1, :], slots)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        with self._lock:
            self._merge(slots, kv, real, tokens)
        for slot, token in zip(slots, tokens):
            slot.accept(token)

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
        self._active.extend(slots)
        self._next_tokens.extend(tokens)

    def _decode_step(self) -> None:
        import torch

        device = self.model.device
        slots = self._active
        ids = torch.tensor(self._next_tokens, device=device).unsqueeze(1)
        positions = torch.tensor([s.position - 1 for s in slots], device=device).unsqueeze(1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(slots), 1)], dim=1)
        attention = self._mask[:, None, None, :]
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=attention,
                         cache=_make_cache(self._layers), use_cache=True, logits_to_keep=1)
        tokens = self._sample(out.logits[:, -1, :], slots)
        for i, (slot, token) in enumerate(zip(slots, tokens)):
            if slot.request.cancel.is_set():
                slot.cancel()
                continue
            self._next_tokens[i] = token
            slot.accept(token)

    def _sample(self, logits, slots: list[_Slot]) -> list[int]:
        import torch

        logits = logits.float()
        tokens = torch.argmax(logits, dim=-1).tolist()
        for i, slot in enumerate(slots):
            p = slot.request.params
            if p.greedy:
                continue
            probs = torch.softmax(logits[i] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
                sorted_probs = sorted_probs * keep
                choice = torch.multinomial(sorted_probs, 1, generator=slot.generator)
                tokens[i] = int(order[choice])
            else:
                tokens[i] = int(torch.multinomial(probs, 1, generator=slot.generator))
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
            for layer in self._layers:
                n = layer.length
                layer.keys_buf = layer.keys_buf[index, :, start:n].contiguous()
                layer.values_buf = layer.values_buf[index, :, start:n].contiguous()
                layer.length = n - start
                layer.keys_buf = _resize(layer.keys_buf, layer.length + 64, torch)
                layer.values_buf = _resize(layer.values_buf, layer.length + 64, torch)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            slots, self._active, self._next_tokens = self._active, [], []
            self._layers, self._mask = [], None
        for slot in slots:
            if not slot.done:
                slot.done = True
                slot.request.emit(Event(finish_reason="error", error=message,
                                        completion_tokens=len(slot.generated)))
        while True:
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                with self._lock:
                    self._pending -= 1
                request.emit(Event(finish_reason="error", error=message))


def monotonic() -> float:
    return time.perf_counter()
