"""Dtype names, in one place for the engines, convert, serve and the doctor.

Every verb takes the short names (bf16, fp16, fp32) and the long ones a doctor fix may print
(bfloat16, float16, torch.float32, half, float); each module maps them through this table, so a name
one verb accepts means the same on every other.
"""

from __future__ import annotations

# short name (what --dtype takes) -> torch's name (what configs and torch.<name> use)
TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SHORT_NAMES = {long: short for short, long in TORCH_NAMES.items()}
ALIASES = {**TORCH_NAMES, "half": "float16", "float": "float32"}

# safetensors header codes -> torch's names
SAFETENSORS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
               "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def torch_name(dtype: str | None) -> str:
    """bfloat16 | float16 | float32 for any accepted spelling; "auto" for none; unknown names pass through."""
    dtype = (dtype or "auto").lower().removeprefix("torch.")
    return ALIASES.get(dtype, dtype)


def short_name(dtype: str | None) -> str:
    """bf16 | fp16 | fp32 for any accepted spelling; "auto" for none; unknown names pass through."""
    long = torch_name(dtype)
    return SHORT_NAMES.get(long, long)
