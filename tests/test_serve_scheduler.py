"""The continuous-batching scheduler, driven directly: token ids, joins mid-flight, leaving at once.

Tolerance: none. Every comparison below is of exact greedy token ids; on this CPU in fp32 the
batched step's different matrix shapes have not changed an argmax. If a future kernel did, the
difference would show here first, as a token-id mismatch.
"""

from __future__ import annotations

import threading
import time

import pytest

from setup_kit.serve.app import encode_chat
from setup_kit.serve.scheduler import BatchScheduler, Event, QueueFull, Request, SamplingParams


class Collector:
    """The events of one request. `on_first_text` runs on the engine thread as the first text
    arrives, so a test can act at an exact point of the stream instead of polling a clock."""

    def __init__(self, on_first_text=None):
        self.events: list[Event] = []
        self.done = threading.Event()
        self.started = threading.Event()
        self.on_first_text = on_first_text
        self.tokens_at_first_text: int | None = None

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.text and not self.started.is_set():
            # Each token's logprob rides on the text event it ended in (requests asking logprobs=0).
            self.tokens_at_first_text = sum(len(e.logprobs or ()) for e in self.events)
            if self.on_first_text is not None:
                self.on_first_text()
            self.started.set()
        if event.finish_reason:
            self.done.set()

    @property
    def final(self) -> Event:
        assert self.done.wait(60), "the request never finished"
        return self.events[-1]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


@pytest.fixture
def scheduler(tiny_model_and_tokenizer):
    model, tokenizer, info = tiny_model_and_tokenizer
    sched = BatchScheduler(model, tokenizer, eos_ids=set(info.eos_token_ids), max_batch=8, max_queue=4)
    sched.start()
    yield sched
    sched.stop()


def prompt(tokenizer, text: str) -> list[int]:
    return encode_chat(tokenizer, [{"role": "user", "content": text}])


def submit(sched, ids, **params) -> Collector:
    sink = Collector()
    sched.submit(Request(prompt_ids=ids, params=SamplingParams(**{"max_tokens": 40, "temperature": 0, **params}),
                         emit=sink))
    return sink


def test_batched_greedy_token_ids_equal_lone_ones_even_when_joining_mid_flight(scheduler, tiny_model_and_tokenizer):
    _, tokenizer, _ = tiny_model_and_tokenizer
    prompts = [prompt(tokenizer, "x " * (1 + 3 * i) + f"question {i}") for i in range(6)]
    lone = [submit(scheduler, p).final.token_ids for p in prompts]
    # Three start together; three more join while those are decoding (different lengths, so the
    # batch is re-padded on each join and trimmed as rows leave).
    sinks = [submit(scheduler, p) for p in prompts[:3]]
    assert sinks[0].started.wait(60), "the first request never streamed"
    sinks += [submit(scheduler, p) for p in prompts[3:]]
    assert [s.final.token_ids for s in sinks] == lone


def test_reference_generate_agrees_with_a_lone_request(scheduler, tiny_model_and_tokenizer):
    import torch

    model, tokenizer, _ = tiny_model_and_tokenizer
    ids = prompt(tokenizer, "Compare me with generate")
    ours = submit(scheduler, ids, max_tokens=24).final
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    theirs = out[0, len(ids):].tolist()
    # generate stops at end of turn and includes that token; we stop there without emitting it.
    assert theirs[:len(ours.token_ids)] == ours.token_ids


def test_cancelled_request_leaves_the_batch_within_a_few_tokens(scheduler, tiny_model_and_tokenizer):
    _, tokenizer, _ = tiny_model_and_tokenizer
    ids = prompt(tokenizer, "a long answer please")
    request = None
    # The client leaves as its first text arrives (set on the engine thread, so no clock race).
    sink = Collector(on_first_text=lambda: request.cancel.set())
    request = Request(prompt_ids=ids, params=SamplingParams(max_tokens=200, temperature=0, logprobs=0), emit=sink)
    scheduler.submit(request)
    final = sink.final
    assert final.finish_reason == "cancelled"
    # Within a token of leaving: at most one step more than the tokens it had when it left.
    assert final.completion_tokens <= sink.tokens_at_first_text + 1, (final.completion_tokens,
                                                                       sink.tokens_at_first_text)
    # The final event is sent just before the engine thread drops the slot; it is free moments later.
    deadline = time.monotonic() + 10
    while scheduler.load["active"] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert scheduler.load["active"] == 0


def test_never_valid_bytes_stream_as_replacement_characters(scheduler, tiny_model_and_tokenizer):
    """Random weights emit lone byte tokens; they come out as U+FFFD, and the reply still finishes."""
    _, tokenizer, _ = tiny_model_and_tokenizer
    sinks = [submit(scheduler, prompt(tokenizer, f"bytes {i}"), max_tokens=60) for i in range(4)]
    texts = [s.text for s in sinks if s.final.finish_reason in ("stop", "length")]
    assert len(texts) == 4
    assert any("\ufffd" in t for t in texts)


def test_stop_string_is_cut_and_not_emitted(scheduler, tiny_model_and_tokenizer):
    _, tokenizer, _ = tiny_model_and_tokenizer
    ids = prompt(tokenizer, "Tell me a story")
    whole = submit(scheduler, ids, max_tokens=40)
    assert whole.final.finish_reason == "length"
    stop = whole.text[10:12]
    cut = submit(scheduler, ids, max_tokens=40, stop=(stop,))
    assert cut.final.finish_reason == "stop"
    assert cut.text == whole.text[:whole.text.index(stop)]


def test_queue_limit_counts_only_requests_waiting_for_a_slot(tiny_model_and_tokenizer):
    model, tokenizer, info = tiny_model_and_tokenizer
    sched = BatchScheduler(model, tokenizer, eos_ids=set(info.eos_token_ids), max_batch=1, max_queue=1)
    # Not started: nothing is admitted, so the one slot is "free" for the first, the second waits.
    ids = prompt(tokenizer, "hi")
    sinks = [Collector(), Collector()]
    for sink in sinks:
        sched.submit(Request(prompt_ids=ids, params=SamplingParams(max_tokens=2), emit=sink))
    with pytest.raises(QueueFull):
        sched.submit(Request(prompt_ids=ids, params=SamplingParams(max_tokens=2), emit=Collector()))
    sched.start()
    sched.stop()
    # Whatever was not generated before the stop is answered (with an error), never left hanging.
    assert all(s.done.wait(10) for s in sinks)


def test_max_tokens_is_clipped_to_the_context_window(scheduler, tiny_model_and_tokenizer):
    _, tokenizer, _ = tiny_model_and_tokenizer
    window = scheduler.context_window
    ids = prompt(tokenizer, "fill " * (window // 2))[: window - 5]
    final = submit(scheduler, ids, max_tokens=1000).final
    assert final.completion_tokens <= 5
    assert final.finish_reason in ("stop", "length")


def test_a_request_cancelled_while_waiting_leaves_the_queue_at_once(tiny_model_and_tokenizer):
    from fixtures.servers import PacedModel

    model, tokenizer, info = tiny_model_and_tokenizer
    sched = BatchScheduler(PacedModel(model, 0.02), tokenizer, eos_ids=set(info.eos_token_ids), max_batch=1,
                           max_queue=2)
    sched.start()
    try:
        ids = prompt(tokenizer, "a long answer please")
        running = submit(sched, ids, max_tokens=200)
        deadline = time.monotonic() + 10
        while sched.load["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = Collector()
        queued = sched.submit(Request(prompt_ids=ids, params=SamplingParams(max_tokens=5, temperature=0),
                                      emit=waiting))
        assert sched.load["waiting"] == 1
        sched.cancel(queued)
        assert sched.load["waiting"] == 0 and waiting.final.finish_reason == "cancelled"
        assert not running.done.is_set()  # the running request goes on
    finally:
        sched.stop()


def test_close_ends_running_and_waiting_requests_with_their_own_error_and_admits_no_more(tiny_model_and_tokenizer):
    from fixtures.servers import PacedModel

    from setup_kit.serve.scheduler import ShuttingDown

    model, tokenizer, info = tiny_model_and_tokenizer
    sched = BatchScheduler(PacedModel(model, 0.02), tokenizer, eos_ids=set(info.eos_token_ids), max_batch=1)
    sched.start()
    try:
        ids = prompt(tokenizer, "a long answer please")
        running, waiting = submit(sched, ids, max_tokens=200), submit(sched, ids, max_tokens=200)
        deadline = time.monotonic() + 10
        while not running.text and time.monotonic() < deadline:
            time.sleep(0.01)
        sched.close()
        for sink in (running, waiting):
            assert sink.final.finish_reason == "error" and sink.final.error_type == "server_shutting_down"
        with pytest.raises(ShuttingDown):
            submit(sched, ids)
    finally:
        sched.stop()


@pytest.mark.parametrize("params", [dict(temperature=9e-39), dict(temperature=1.0, top_p=1e-45),
                                    dict(temperature=1.0, seed=2**64 + 1), dict(temperature=2.0, seed=-5)])
def test_extreme_sampling_values_sample_without_error(scheduler, tiny_model_and_tokenizer, params):
    _, tokenizer, _ = tiny_model_and_tokenizer
    final = submit(scheduler, prompt(tokenizer, "Pick a word"), max_tokens=8, **params).final
    assert final.finish_reason in ("stop", "length"), final.error
