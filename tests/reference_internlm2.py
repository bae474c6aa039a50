"""An independent InternLM2 forward pass in plain torch, written from the architecture.

This is what the converter and the native engine are checked against. It reads the checkpoint
under InternLM2's own tensor names and never touches transformers or the kit's code:

- embeddings `model.tok_embeddings`, output head `output` (not tied);
- per layer: RMSNorm `attention_norm` -> attention -> residual, RMSNorm `ffn_norm` -> SwiGLU
  feed-forward (w1 gate, w3 up, w2 down) -> residual; final RMSNorm `model.norm`;
- attention: `wqkv` packs, for each of the KV heads, its group of query heads, then that group's
  key head, then its value head, each head_dim rows: [kv_heads, q_per_kv + 2, head_dim, hidden];
- rotary embeddings on the rotate-half convention, base `rope_theta`; with rope_scaling
  `dynamic` the base grows for sequences longer than max_position_embeddings (NTK-aware);
- causal softmax attention in float32, grouped-query (each KV head serves q_per_kv query heads).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def load_internlm2(folder: Path) -> tuple[dict, dict]:
    """(config, tensors in float32) from an InternLM2 folder: safetensors or .bin, sharded or not."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            part = load_file(str(path))
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
        tensors.update({k: v.float() for k, v in part.items()})
    return config, tensors


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def rope_base(config: dict, seq_len: int, head_dim: int) -> float:
    base = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {}
    max_pos = config["max_position_embeddings"]
    if scaling.get("type") == "dynamic" and seq_len > max_pos:
        factor = float(scaling["factor"])
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return base


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [seq, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin


def attention(x: torch.Tensor, tensors: dict, prefix: str, config: dict) -> torch.Tensor:
    batch, seq, hidden = x.shape
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, q_per_kv = hidden // heads, heads // kv_heads

    wqkv = tensors[prefix + "attention.wqkv.weight"].view(kv_heads, q_per_kv + 2, head_dim, hidden)
    qkv = torch.einsum("bsh,gjdh->bsgjd", x, wqkv)  # [batch, seq, kv_heads, q_per_kv+2, head_dim]
    q = qkv[:, :, :, :q_per_kv].reshape(batch, seq, heads, head_dim).transpose(1, 2)
    k = qkv[:, :, :, q_per_kv].transpose(1, 2)  # [batch, kv_heads, seq, head_dim]
    v = qkv[:, :, :, q_per_kv + 1].transpose(1, 2)

    positions = torch.arange(seq)
    base = rope_base(config, seq, head_dim)
    q, k = apply_rope(q, positions, base), apply_rope(k, positions, base)
    # Query head h belongs to group h // q_per_kv.
    k = k.repeat_interleave(q_per_kv, dim=1)
    v = v.repeat_interleave(q_per_kv, dim=1)

    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    out = scores.softmax(dim=-1) @ v  # [batch, heads, seq, head_dim]
    out = out.transpose(1, 2).reshape(batch, seq, hidden)
    return out @ tensors[prefix + "attention.wo.weight"].T


def feed_forward(x: torch.Tensor, tensors: dict, prefix: str) -> torch.Tensor:
    gate = x @ tensors[prefix + "feed_forward.w1.weight"].T
    up = x @ tensors[prefix + "feed_forward.w3.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ tensors[prefix + "feed_forward.w2.weight"].T


@torch.no_grad()
def forward(config: dict, tensors: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] in float32 for `input_ids` [batch, seq]."""
    eps = config["rms_norm_eps"]
    x = tensors["model.tok_embeddings.weight"][input_ids]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        x = x + attention(rms_norm(x, tensors[prefix + "attention_norm.weight"], eps),
                          tensors, prefix, config)
        x = x + feed_forward(rms_norm(x, tensors[prefix + "ffn_norm.weight"], eps), tensors, prefix)
    x = rms_norm(x, tensors["model.norm.weight"], eps)
    return x @ tensors["output.weight"].T


def reference_logits(folder: Path, input_ids) -> torch.Tensor:
    config, tensors = load_internlm2(folder)
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    return forward(config, tensors, ids if ids.dim() == 2 else ids[None])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over the whole tensor."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())
