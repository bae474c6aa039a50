"""One table of dtype names: a spelling any verb accepts (a doctor fix may print `--dtype float16`,
a user may type `torch.bfloat16` or `half`) means the same dtype on every verb."""

from __future__ import annotations

import json

import pytest

from setup_kit import dtypes
from setup_kit.convert import convert_checkpoint
from setup_kit.engines.native import choose_device_dtype
from setup_kit.serve.backends import lmdeploy_command, vllm_command

SPELLINGS = {"bf16": "bfloat16", "BF16": "bfloat16", "bfloat16": "bfloat16", "torch.bfloat16": "bfloat16",
             "fp16": "float16", "half": "float16", "float16": "float16", "torch.float16": "float16",
             "fp32": "float32", "float": "float32", "float32": "float32", "torch.float32": "float32"}


@pytest.mark.parametrize("spelling,torch_name", SPELLINGS.items())
def test_every_spelling_maps_to_one_dtype(spelling, torch_name):
    assert dtypes.torch_name(spelling) == torch_name
    assert dtypes.TORCH_NAMES[dtypes.short_name(spelling)] == torch_name


@pytest.mark.parametrize("spelling", ["half", "torch.bfloat16"])
def test_serve_backends_get_the_same_dtype(spelling, tmp_path):
    short = dtypes.short_name(spelling)
    for make in (vllm_command, lmdeploy_command):
        argv = make("x", tmp_path, name="m", host="127.0.0.1", port=1, tp=1, dtype=short).argv
        assert argv[argv.index("--dtype") + 1] == dtypes.torch_name(spelling)


def test_native_engine_and_convert_take_the_short_names(tiny_internlm2_dir, tmp_path):
    assert choose_device_dtype("cpu", dtypes.short_name("torch.bfloat16"))[1] == "bf16"
    result = convert_checkpoint(tiny_internlm2_dir, tmp_path / "out", dtype=dtypes.short_name("torch.float32"))
    assert result.dtype == "float32"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def test_unknown_and_empty_names():
    assert dtypes.torch_name(None) == dtypes.short_name("") == "auto"
    assert dtypes.short_name("int4") == "int4"  # quantized formats pass through to the native engine
