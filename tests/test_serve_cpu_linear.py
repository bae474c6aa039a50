"""serve's fp32 CPU linear layers on oneDNN for batched rows (setup_kit/serve/cpu_linear.py).

Which path wins is timed at load, so these tests force each path and check what it computes: the
same numbers as torch's linear (within fp32 rounding), one row always bit-identical to it, the same
greedy tokens from the batching scheduler, and no change at all where memory or dtype rule it out.
The speed itself is measured by benchmarks/serve_speed.py, not here.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from setup_kit.serve import cpu_linear  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN ops")


def fresh_model(model_dir, dtype="fp32"):
    from setup_kit.engines.native import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir, device="cpu", dtype=dtype)


def force(model, wins: dict[int, bool]) -> int:
    """Every fp32 linear layer on the given per-row-count choice, whatever timing would say."""
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            cpu_linear._install(m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 8), wins)
            n += 1
    return n


def test_a_layer_computes_what_torch_linear_does_on_either_path():
    layer = torch.nn.Linear(48, 80)
    reference = torch.nn.Linear(48, 80)
    reference.load_state_dict(layer.state_dict())
    cpu_linear._install(layer, torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 8),
                        {1: False, 2: True, 4: True, 8: True, 64: True})
    with torch.inference_mode():
        one = torch.randn(1, 1, 48)
        assert torch.equal(layer(one), reference(one))  # one row: torch's own path, bit for bit
        for rows in (2, 3, 5, 8, 9, 100):
            x = torch.randn(rows, 1, 48)
            got = layer(x)
            assert got.shape == (rows, 1, 80)
            torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-5)


def test_row_counts_between_timed_ones_take_the_choice_of_the_one_below(monkeypatch):
    layer = torch.nn.Linear(16, 16, bias=False)
    calls = []
    original = cpu_linear._onednn
    monkeypatch.setattr(cpu_linear, "_onednn", lambda x, *rest: calls.append(x.shape[0]) or original(x, *rest))
    cpu_linear._install(layer, torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 8),
                        {1: False, 2: False, 4: True, 8: False, 64: True})
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 5, 7, 8, 20, 64, 200):
            layer(torch.randn(rows, 16))
    assert calls == [4, 5, 7, 64, 200]


def test_the_scheduler_gives_the_same_greedy_tokens_on_the_onednn_path(tiny_internlm2_dir):
    from setup_kit.serve.app import encode_chat
    from setup_kit.serve.scheduler import BatchScheduler, Request, SamplingParams

    model, tokenizer, info = fresh_model(tiny_internlm2_dir)

    def run_all(prompts) -> list[list[int]]:
        sched = BatchScheduler(model, tokenizer, eos_ids=set(info.eos_token_ids), max_batch=8, max_queue=8)
        finals = {}
        for i, text in enumerate(prompts):
            ids = encode_chat(tokenizer, [{"role": "user", "content": text}])
            sched.submit(Request(ids, SamplingParams(max_tokens=30, temperature=0),
                                 lambda e, i=i: finals.__setitem__(i, e) if e.finish_reason else None))
        with torch.inference_mode():  # driven in this thread: all admitted in one prefill
            sched._admit(block=False)
            while sched._active:
                sched._decode_step()
                sched._drop_finished()
        return [finals[i].token_ids for i in range(len(prompts))]

    prompts = ["x " * (1 + 3 * i) + f"question {i}" for i in range(6)]
    plain = run_all(prompts)
    assert force(model, {1: False, 2: True, 4: True, 8: True, 64: True})
    assert run_all(prompts) == plain


def test_nothing_changes_without_room_for_the_copy_or_in_bf16(tiny_internlm2_dir, one_thread):
    model, _, _ = fresh_model(tiny_internlm2_dir)
    assert cpu_linear.prepare(model, free_bytes=1000) is None
    assert not any(hasattr(m, "_kit_onednn_weight") for m in model.modules())
    bf16, _, _ = fresh_model(tiny_internlm2_dir, dtype="bf16")
    assert cpu_linear.prepare(bf16, free_bytes=1 << 40) is None
    assert not any(hasattr(m, "_kit_onednn_weight") for m in bf16.modules())


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_only_on_one_torch_thread(tiny_internlm2_dir):
    model, _, _ = fresh_model(tiny_internlm2_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cpu_linear.prepare(model, free_bytes=1 << 40) is None
    finally:
        torch.set_num_threads(threads)
    assert not any(hasattr(m, "_kit_onednn_weight") for m in model.modules())


def test_prepare_keeps_the_model_s_answers(tiny_internlm2_dir, one_thread):
    """Whatever the timing chose, a batch forward gives what it gave before (fp32 rounding)."""
    model, tokenizer, _ = fresh_model(tiny_internlm2_dir)
    ids = torch.randint(3, 200, (4, 12))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        note = cpu_linear.prepare(model, max_rows=8, free_bytes=1 << 40)
        after = model(input_ids=ids).logits
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
    chosen = [m for m in layers if hasattr(m, "_kit_onednn_weight")]
    if chosen:
        assert note == f"{len(chosen)} of {len(layers)} fp32 linear layers use oneDNN for batched rows (timed at load)"
    else:
        assert note is None
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
