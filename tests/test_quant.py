"""Quantized CPU formats of the native engine: int8 and int4 weights, made once per folder and cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from fixtures.servers import start_kit_serve, stop_process
from reference_internlm2 import reference_logits, relative_error

from setup_kit.engines import quant
from setup_kit.engines.base import GenerationParams
from setup_kit.engines.native import NativeEngine, choose_device_dtype, choose_format
from setup_kit.errors import UsageError

EXE = str(Path(sys.executable).with_name("internlm-kit"))
CHAT = [{"role": "user", "content": "你好，请介绍一下上海。Tell me about Shanghai."}]
GREEDY = GenerationParams(max_new_tokens=24, greedy=True)


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("INTERNLM_KIT_STATE_DIR", str(path))
    return path


@pytest.fixture
def folder(tiny_internlm2_dir, tmp_path) -> Path:
    """A copy of the tiny model the test may change."""
    return Path(shutil.copytree(tiny_internlm2_dir, tmp_path / "tiny-internlm2-chat"))


def teacher_forced_agreement(engine, reference, ids) -> float:
    """Share of positions where the engine's top-1 token is the reference's, same inputs."""
    with torch.no_grad():
        mine = engine.model(torch.tensor([ids])).logits[0].float()
    return float((mine.argmax(-1) == reference[0].argmax(-1)).float().mean())


# Measured on this random tiny model (its logits are nearly flat, so top-1 flips easily): bf16 0.7%
# error and 99% agreement, int8 4.5% and 94%, int4 13% and 71%.
@pytest.mark.parametrize("fmt,most_error,least_agreement", [("int8", 0.08, 0.85), ("int4", 0.2, 0.6)])
def test_quantized_logits_stay_close_to_the_reference(folder, state, fmt, most_error, least_agreement):
    engine = NativeEngine(folder, device="cpu", dtype=fmt)
    assert engine.info.dtype == fmt and f"cpu {fmt}" in engine.describe()
    ids = engine.encode_chat(CHAT) + list(range(40, 140))
    expected = reference_logits(folder, [ids])
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits.float()
    assert relative_error(logits, expected) < most_error
    assert teacher_forced_agreement(engine, expected, ids) >= least_agreement
    # Every linear layer is quantized, the output layer and the embedding too.
    assert not [n for n, m in engine.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert type(engine.model.model.embed_tokens).__name__ == "Int8Embedding"
    assert engine.info.parameters == NativeEngine(folder, device="cpu", dtype="fp32").info.parameters
    # What is not quantized (the norms) and the residual stream are in the compute dtype, fp32, with
    # the embedding's output too: a bf16 embedding before fp32 norms failed SDPA on transformers 4.38.
    compute = torch.float32
    assert {p.dtype for p in engine.model.parameters()} == {compute}
    seen = []
    hook = engine.model.model.layers[0].register_forward_hook(lambda m, args, out: seen.append(out[0].dtype
                                                              if isinstance(out, tuple) else out.dtype))
    with torch.no_grad():
        engine.model(torch.tensor([ids[:8]]))
    hook.remove()
    assert seen == [compute]


def test_the_cache_is_made_once_and_reused(folder, state, monkeypatch):
    first = NativeEngine(folder, device="cpu", dtype="int8")
    made = list(state.glob("quantized/*-int8/chunk-*.safetensors"))
    assert made, "the quantized weights are cached under the state dir"

    def no_requantizing(*args, **kwargs):
        raise AssertionError("quantized again although the cache is valid")

    monkeypatch.setattr(quant, "quantize", no_requantizing)
    second = NativeEngine(folder, device="cpu", dtype="int8")
    prompt = first.encode_chat(CHAT)
    assert list(second.generate_tokens(prompt, GREEDY)) == list(first.generate_tokens(prompt, GREEDY))


def count_quantize_calls(monkeypatch) -> list:
    calls = []
    real = quant.quantize

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(quant, "quantize", counting)
    return calls


def test_a_changed_folder_is_quantized_again(folder, state, monkeypatch):
    NativeEngine(folder, device="cpu", dtype="int8")
    shard = sorted(folder.glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    calls = count_quantize_calls(monkeypatch)
    NativeEngine(folder, device="cpu", dtype="int8")
    assert "lm_head.weight" in calls


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_a_damaged_cache_is_rebuilt(folder, state, monkeypatch, damage):
    reference = NativeEngine(folder, device="cpu", dtype="int8")
    chunk = sorted(state.glob("quantized/*-int8/chunk-*.safetensors"))[0]
    data = chunk.read_bytes()
    if damage == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    elif damage == "garble":  # same size, unreadable header
        chunk.write_bytes(b"\xff" * 16 + data[16:])
    else:
        chunk.unlink()
    calls = count_quantize_calls(monkeypatch)
    rebuilt = NativeEngine(folder, device="cpu", dtype="int8")
    assert "lm_head.weight" in calls
    prompt = reference.encode_chat(CHAT)
    assert list(rebuilt.generate_tokens(prompt, GREEDY)) == list(reference.generate_tokens(prompt, GREEDY))


def test_a_converted_llama_folder_quantizes_too(tiny_llama_dir, state):
    engine = NativeEngine(tiny_llama_dir, device="cpu", dtype="int4")
    assert engine.info.layout == "llama" and engine.info.dtype == "int4"
    assert list(engine.generate_tokens(engine.encode_chat(CHAT), GREEDY))


# --- defaults chosen from the machine -----------------------------------------------------------

def test_cpu_defaults(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, compute, fmt, reason, _ = choose_format("auto", "auto")
    assert (device, compute, fmt) == ("cpu", "fp32", "int4") and "int4" in reason
    assert choose_format("cpu", "fp32")[1:3] == ("fp32", None)
    assert choose_format("auto", "int8")[:3] == ("cpu", "fp32", "int8")
    # A torch without the int4 kernels (before 2.6): int8.
    monkeypatch.setattr(quant, "int4_kernel_available", lambda: False)
    assert choose_format("cpu", "auto")[2] == "int8"
    # Without int8 kernels, or for the float formats: bf16 where the CPU has it natively.
    monkeypatch.setattr(quant, "native_bf16", lambda: True)
    assert choose_device_dtype("cpu", "auto")[1] == "bf16"
    monkeypatch.setattr(quant, "native_bf16", lambda: False)
    assert choose_device_dtype("cpu", "auto")[1] == "fp32"
    monkeypatch.setattr(quant, "int8_kernel_available", lambda: False)
    assert choose_format("cpu", "auto")[2] is None
    with pytest.raises(UsageError, match="CPU format"):
        choose_format("cuda", "int8")


def test_a_layer_whose_shape_int4_cannot_pack_stays_in_the_compute_dtype():
    """A vocabulary of 100 rows (not a multiple of 16) or 40 inputs (not of the group size): that
    layer is kept as it is instead of the load failing in torch's packer."""
    for shape in ((100, 64), (64, 40)):
        stored = quant.quantize("int4", "lm_head.weight", torch.randn(*shape))
        assert list(stored) == ["lm_head.weight"] and stored["lm_head.weight"].shape == shape
    assert set(quant.quantize("int4", "lm_head.weight", torch.randn(32, 64))) == {"lm_head.weight.q4",
                                                                                  "lm_head.weight.sz"}


def fake_cpus(root: Path, cores: list[tuple[int, int]]) -> Path:
    """/sys/devices/system/cpu as Linux lays it out: cpuN/topology/{physical_package_id,core_id}."""
    for n, (package, core) in enumerate(cores):
        topology = root / f"cpu{n}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


def test_threads_default_to_physical_cores(tmp_path, monkeypatch):
    # Eight CPUs: two sockets of two cores, each with two hyper-threads.
    root = fake_cpus(tmp_path, [(p, c) for p in (0, 1) for c in (0, 1)] * 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert quant.physical_cores(root) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 4})  # one core's two threads
    assert quant.physical_cores(root) == 1
    # Cores another process keeps busy are left to it.
    assert quant.default_threads(cores=4, load=0.2) == 4
    assert quant.default_threads(cores=4, load=1.1) == 3
    assert quant.default_threads(cores=2, load=7.0) == 1


def test_banner_and_stats_say_format_and_threads(folder, state):
    import pexpect

    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(state), "NO_COLOR": "1", "TERM": "dumb"}
    child = pexpect.spawn(EXE, ["chat", "--model", str(folder), "--device", "cpu", "--skip-checks",
                                "--greedy", "--max-new-tokens", "4"], env=env, encoding="utf-8", timeout=300)
    try:
        child.expect(">>> ")
        banner = child.before
        assert "cpu int4" in banner and "physical cores" in banner, banner
        child.sendline("/stats")
        child.expect(">>> ")
        assert "engine: native engine · cpu int4" in child.before and "thread" in child.before, child.before
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert list(state.glob("quantized/*-int4/manifest.json"))
    asked = subprocess.run([EXE, "chat", "--model", str(folder), "--device", "cpu", "--skip-checks", "--dtype",
                            "int8", "--threads", "1", "--prompt", "hi", "--max-new-tokens", "2"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert asked.returncode == 0, asked.stderr
    assert "cpu int8" in asked.stderr and "1 thread" in asked.stderr, asked.stderr


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_serve_answers_on_the_quantized_model(folder, tmp_path, fmt):
    server = start_kit_serve(Path(sys.executable), folder, tmp_path / "serve", "--dtype", fmt)
    try:
        reply = httpx.post(server.url + "/chat/completions", timeout=120,
                           json={"model": server.model, "max_tokens": 8, "temperature": 0,
                                 "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        stop_process(server.process)
    manifest = next((tmp_path / "serve" / "state").glob(f"quantized/*-{fmt}/manifest.json"))
    assert json.loads(manifest.read_text())["format"] == fmt
