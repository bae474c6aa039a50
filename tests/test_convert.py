"""`internlm-kit convert`: an InternLM2 checkpoint becomes a plain Llama folder that current
transformers loads without remote code, with the same logits and the same token ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures.models import CHAT_TOKENS, UNUSED_PIECES, build_tiny_internlm2
from reference_internlm2 import reference_logits, relative_error

from setup_kit.convert import convert_checkpoint
from setup_kit.errors import KitError, UsageError

ENGLISH = "Hello world! The quick brown fox jumps over the lazy dog. Numbers: 2024, 42."
CHINESE = "你好！我是书生浦语，今天天气很好。上海人工智能实验室"
MIXED = "InternLM 可以用中文和 English 交流 😀, line one\nline two\ttab"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "setup_kit", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def converted(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # no trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return model.eval(), tokenizer


def variant(tmp_path_factory, tiny_internlm2_dir, name: str, **config) -> Path:
    """Another tiny checkpoint, reusing the session's tokenizer.model (training takes a second)."""
    return build_tiny_internlm2(tmp_path_factory.mktemp("variants") / name,
                                tokenizer_model=tiny_internlm2_dir / "tokenizer.model", **config)


# --- what a user gets -------------------------------------------------------------------------

def test_converted_folder_is_plain_llama_with_no_remote_code(tiny_llama_dir, converted):
    model, tokenizer = converted
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not list(tiny_llama_dir.glob("*.py")), "no remote code may travel along"
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is False
    assert config["rope_theta"] == 1_000_000.0
    assert config["rope_scaling"]["factor"] == 2.0 and config["rope_scaling"]["type"] == "dynamic"
    assert model.config.rope_parameters["rope_type"] == "dynamic"
    tok_config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_config


def test_logits_match_the_reference_forward_pass_in_float32(tiny_internlm2_dir, converted):
    model, tokenizer = converted
    ids = tokenizer.encode(ENGLISH + CHINESE + MIXED)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert relative_error(logits, reference_logits(tiny_internlm2_dir, [ids])) < 1e-5


def test_dynamic_rope_scaling_is_carried_past_max_positions(tiny_internlm2_dir, converted):
    model, _ = converted
    ids = torch.randint(3, 400, (1, 300), generator=torch.Generator().manual_seed(1))
    assert ids.shape[1] > model.config.max_position_embeddings  # 256: scaling kicks in
    with torch.no_grad():
        logits = model(ids).logits
    expected = reference_logits(tiny_internlm2_dir, ids)
    assert relative_error(logits, expected) < 1e-5
    # The check has teeth: without the dynamic base the reference gives other logits.
    from reference_internlm2 import forward, load_internlm2

    config, tensors = load_internlm2(tiny_internlm2_dir)
    unscaled = forward({**config, "rope_scaling": None}, tensors, ids)
    assert relative_error(unscaled, expected) > 1e-3


def test_chat_tokens_keep_their_sentencepiece_ids(tiny_sentencepiece, converted):
    _, tokenizer = converted
    vocab_size = tiny_sentencepiece.get_piece_size()
    for piece, name in zip(UNUSED_PIECES, CHAT_TOKENS):
        expected = tiny_sentencepiece.piece_to_id(piece)
        assert expected >= vocab_size - 6
        assert tokenizer.convert_tokens_to_ids(name) == expected
        assert tokenizer.encode(name, add_special_tokens=False) == [expected]
    assert len(tokenizer) == vocab_size, "no token may get an id past the embedding table"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode([im_end], skip_special_tokens=True) == ""


def test_chat_tokens_keep_the_real_models_ids_at_full_vocabulary_size(tiny_internlm2_dir, tmp_path):
    """The hub's tokenizer.model has 92544 pieces: <|im_end|> must stay 92542, <|im_start|> 92543."""
    import shutil

    from fixtures.models import _tokenizer_files, grow_tokenizer_model
    from setup_kit.tokenizer_files import write_tokenizer

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(tiny_internlm2_dir / "tokenizer.model", src / "tokenizer.model")
    assert grow_tokenizer_model(src / "tokenizer.model") == 92544
    _tokenizer_files(src, 92544)
    write_tokenizer(src, tmp_path / "out")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == 92544
    assert [tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS] == list(range(92538, 92544))
    assert tokenizer.encode("<|im_start|>user\n你好<|im_end|>", add_special_tokens=False)[0] == 92543


@pytest.mark.parametrize("text", [ENGLISH, CHINESE, MIXED, "书生·浦语 InternLM2-chat-1.8B"])
def test_token_ids_equal_sentencepiece(tiny_sentencepiece, converted, text):
    _, tokenizer = converted
    assert tokenizer.encode(text, add_special_tokens=False) == tiny_sentencepiece.encode(text)
    assert tokenizer.encode(text)[0] == 1  # <s>
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_chat_template_and_generation_config_are_carried(tiny_llama_dir, tiny_sentencepiece, converted):
    _, tokenizer = converted
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[:2] == [1, tokenizer.convert_tokens_to_ids("<|im_start|>")]
    generation = json.loads((tiny_llama_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, tiny_sentencepiece.piece_to_id("[UNUSED_TOKEN_145]")]


def test_generation_config_is_made_when_the_source_has_none(tmp_path_factory, tiny_internlm2_dir,
                                                            tmp_path):
    src = variant(tmp_path_factory, tiny_internlm2_dir, "no-generation-config")
    (src / "generation_config.json").unlink()
    convert_checkpoint(src, tmp_path / "out")
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    assert generation["eos_token_id"] == [2, vocab - 2]  # </s> and <|im_end|>


def test_weights_are_sharded_with_an_index(tiny_internlm2_dir, tmp_path):
    result = convert_checkpoint(tiny_internlm2_dir, tmp_path / "out", max_shard_bytes=150_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert result.shards == len(shards) >= 3
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == result.bytes_written
    assert len(index["weight_map"]) == result.tensors == 2 + 1 + 2 * 9  # embed, norm, head; 9 per layer
    for shard in shards:  # no shard much over the limit (one tensor may exceed it alone)
        assert (tmp_path / "out" / shard).stat().st_size < 150_000 + 70_000


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoints_convert_too(tmp_path_factory, tiny_internlm2_dir, tmp_path, shards):
    src = variant(tmp_path_factory, tiny_internlm2_dir, f"bin-{shards}", weights_format="bin",
                  shards=shards, seed=5)
    convert_checkpoint(src, tmp_path / "out")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        logits = model(ids).logits
    assert relative_error(logits, reference_logits(src, ids)) < 1e-5


def test_a_damaged_bin_shard_is_refused_cleanly(tmp_path_factory, tiny_internlm2_dir, tmp_path):
    src = variant(tmp_path_factory, tiny_internlm2_dir, "bad-bin", weights_format="bin", shards=2)
    (src / "pytorch_model-00002-of-00002.bin").write_bytes(b"<html>Bad gateway</html>")
    with pytest.raises(KitError, match="cannot be read as a PyTorch checkpoint"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dtype_option_casts_the_weights(tiny_internlm2_dir, tmp_path):
    from safetensors import safe_open

    result = convert_checkpoint(tiny_internlm2_dir, tmp_path / "bf16", dtype="bf16")
    assert result.dtype == "bfloat16"
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    # Half the bytes of the float32 source.
    source_bytes = sum(p.stat().st_size for p in tiny_internlm2_dir.glob("*.safetensors"))
    assert result.bytes_written < source_bytes * 0.55


# --- refusals: clear message, nothing half-written -------------------------------------------

def test_bias_checkpoints_are_refused(tmp_path_factory, tiny_internlm2_dir, tmp_path):
    src = variant(tmp_path_factory, tiny_internlm2_dir, "with-bias", bias=True)
    with pytest.raises(KitError, match="bias=True"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensors_are_named(tmp_path_factory, tiny_internlm2_dir, tmp_path):
    src = variant(tmp_path_factory, tiny_internlm2_dir, "missing",
                  drop_tensors=("model.layers.1.feed_forward.w2.weight",))
    with pytest.raises(KitError, match=r"missing 1 tensor.*layers\.1\.feed_forward\.w2"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_match_the_config_are_refused(tmp_path_factory, tiny_internlm2_dir,
                                                          tmp_path):
    src = variant(tmp_path_factory, tiny_internlm2_dir, "mismatch")
    config = json.loads((src / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the wqkv tensors were packed for 2 KV heads
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(KitError, match=r"attention\.wqkv\.weight has shape \[128, 64\].*\[192, 64\]"):
        convert_checkpoint(src, tmp_path / "out")


def test_unknown_model_type_is_refused_by_the_cli(tmp_path_factory, tiny_internlm2_dir, tmp_path):
    src = variant(tmp_path_factory, tiny_internlm2_dir, "qwen-ish", model_type="qwen2")
    run = cli("convert", str(src), str(tmp_path / "out"))
    assert run.returncode == 1
    assert "internlm-kit: error:" in run.stderr and "model_type" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_non_empty_destination_is_kept_unless_forced(tiny_internlm2_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        convert_checkpoint(tiny_internlm2_dir, dst)
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]
    convert_checkpoint(tiny_internlm2_dir, dst, force=True)
    assert not (dst / "notes.txt").exists() and (dst / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary folders left behind"


def test_a_failure_midway_leaves_nothing_behind(tiny_internlm2_dir, tmp_path, monkeypatch):
    import safetensors.torch

    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError):
        convert_checkpoint(tiny_internlm2_dir, tmp_path / "out", max_shard_bytes=150_000)
    assert list(tmp_path.iterdir()) == []


def test_cli_converts_and_says_where(tiny_internlm2_dir, tmp_path):
    run = cli("convert", str(tiny_internlm2_dir), str(tmp_path / "out"), "--dtype", "fp32")
    assert run.returncode == 0, run.stderr
    assert "Wrote" in run.stdout and str(tmp_path / "out") in run.stdout
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    again = cli("convert", str(tiny_internlm2_dir), str(tmp_path / "out"), "--dtype", "int3")
    assert again.returncode == 2 and "--dtype" in again.stderr and "Traceback" not in again.stderr


# --- streaming: memory near one shard, not the model -----------------------------------------

PEAK_SCRIPT = r"""
import json, sys
from pathlib import Path
from setup_kit.convert import convert_checkpoint
from setup_kit.tokenizer_files import build_fast_tokenizer
build_fast_tokenizer(sys.argv[1])  # imports and tokenizer work happen before the baseline
# A first conversion pages in the library code it runs (file-backed RSS that stays), so the
# measured one below grows only by the data it holds.
convert_checkpoint(sys.argv[1], sys.argv[2] + "-warmup", max_shard_bytes=int(sys.argv[3]))

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024

Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the current RSS
base = status("VmRSS:")
result = convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_bytes=int(sys.argv[3]))
print(json.dumps({"growth": status("VmHWM:") - base, "written": result.bytes_written}))
"""


def peak_growth(src: Path, dst: Path, shard_bytes: int) -> dict:
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(src), str(dst), str(shard_bytes)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_peak_memory_stays_near_one_shard(tmp_path_factory, tiny_internlm2_dir, tmp_path):
    src = variant(tmp_path_factory, tiny_internlm2_dir, "wider", hidden_size=256,
                  num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8,
                  num_key_value_heads=4, shards=8)
    streamed = peak_growth(src, tmp_path / "streamed", 4_000_000)
    assert streamed["written"] > 40_000_000
    # Holding the model grows memory by its size; streaming by about one input shard (mapped)
    # plus one output shard: here 5.6 + 4 MB of 45 MB (measured: ~8 MB).
    assert streamed["growth"] < streamed["written"] / 3, streamed
    # The measurement has teeth: one big output shard does hold everything at once.
    whole = peak_growth(src, tmp_path / "whole", 10**12)
    assert whole["growth"] > whole["written"] * 0.9, whole


# --- older stacks read the converted folder too ------------------------------------------------

OLD_STACK_SCRIPT = r"""
import json, sys
from transformers import AutoConfig, AutoTokenizer
folder = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(folder)
config = AutoConfig.from_pretrained(folder)
names = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
messages = [{"role": "user", "content": "你好"}]
print(json.dumps({
    "class": type(tokenizer).__name__, "size": len(tokenizer),
    "chat_ids": [tokenizer.convert_tokens_to_ids(n) for n in names],
    "text_ids": tokenizer.encode(sys.argv[2], add_special_tokens=False),
    "prompt": tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
    "rope_scaling": config.rope_scaling, "rope_theta": config.rope_theta,
    "model_type": config.model_type}))
"""


@pytest.mark.slow
def test_transformers_4_46_reads_the_converted_tokenizer_and_config(tiny_llama_dir, tiny_sentencepiece,
                                                                     tmp_path):
    """The last release the remote code is reported to run cleanly on (no torch needed for this)."""
    from fixtures.venvs import make_venv, pip_install

    python = make_venv(tmp_path / "venv")
    pip_install(python, "transformers==4.46.3", "jinja2")
    run = subprocess.run([str(python), "-c", OLD_STACK_SCRIPT, str(tiny_llama_dir), MIXED],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    size = tiny_sentencepiece.get_piece_size()
    assert seen["size"] == size and seen["chat_ids"] == list(range(size - 6, size))
    assert seen["text_ids"] == tiny_sentencepiece.encode(MIXED)
    assert seen["prompt"] == "<s><|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert seen["model_type"] == "llama" and seen["rope_theta"] == 1_000_000.0
    assert seen["rope_scaling"]["factor"] == 2.0


def test_ctrl_c_during_convert_leaves_nothing_behind(tmp_path_factory, tiny_internlm2_dir, tmp_path):
    import signal
    import time

    src = variant(tmp_path_factory, tiny_internlm2_dir, "to-interrupt", hidden_size=512,
                  num_hidden_layers=12, intermediate_size=2048, num_attention_heads=8,
                  num_key_value_heads=4, shards=4)
    dst = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "setup_kit", "convert", str(src), str(dst),
                             "--max-shard-size", "2MB"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.converting-*/model-*.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "no shard was ever written"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == [], "neither DST nor the temporary folder may remain"


def test_every_output_file_gets_the_same_mode_and_the_rate_is_of_the_weights(tiny_internlm2_dir, tmp_path):
    import os
    import re

    run = cli("convert", str(tiny_internlm2_dir), str(tmp_path / "out"), "--dtype", "fp32")
    assert run.returncode == 0, run.stderr
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # model.safetensors too, not 0600
    shown = re.search(r"in 1 shard, .* (\d+\.\d) s \(weights (\d+\.\d) s, [\d,]+ MB/s; the rest is the tokenizer\)",
                      run.stdout)
    assert shown, run.stdout
    assert float(shown[2]) <= float(shown[1])
