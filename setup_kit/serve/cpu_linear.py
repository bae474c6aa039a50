"""fp32 linear layers on the CPU that stay fast when several requests decode together.

torch's fp32 `linear` goes to MKL's sgemm, which for a handful of rows (2-8: a decode step of a small
batch) repacks the whole weight on every call and runs 1.6-2.3x slower than oneDNN on a weight
reordered once ahead of time (measured on this repository's benchmark shapes and on InternLM2 1.8B's,
1 thread: 4 rows of 2048x2048, 1.17 ms against 0.63 ms). For one row (MKL's gemv), plain `linear` is
the faster one, and which wins in between depends on the shape and the machine. So each distinct
weight shape is timed both ways at load, at the row counts the server will see, and every layer
takes the faster path for the rows of each call.

The reordered copy is a second copy of the weight: this is done only when there is room for it in
the memory that is free (fp32 weights of 1.8B are 7.6 GB). bf16 weights already go to oneDNN, and
the quantized formats have their own kernels: both are left as they are.

One torch thread only (`serve --threads 1`). With two threads MKL's batched sgemm keeps up (the
scheduler's 8-request steps ran 4.3x one request's either way, in one process), and inside the
server, oneDNN's threads on the engine thread beside the event loop made every step slower: 72
against 159 tok/s for one client on this 2-core machine (benchmarks/serve_speed.py).
"""

from __future__ import annotations

import logging
import time
import types

log = logging.getLogger("internlm_kit.serve")

ROWS = (1, 2, 4, 8, 64)  # row counts timed: decode steps of 1..8 requests, and a prefill
FREE_MEMORY_SHARE = 0.5  # the copies may take at most this share of the memory that is free


def available() -> bool:
    """Whether this torch has the oneDNN ops (CPU builds since torch 2.0)."""
    try:
        import torch

        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except Exception:
        return False


def free_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def prepare(model, *, max_rows: int = 8, free_bytes: int | None = None) -> str | None:
    """Give the model's fp32 CPU linear layers the faster path where timing shows one (torch on one
    thread); what was done, in words (None: nothing)."""
    import torch

    layers = [m for m in model.modules()
              if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    if not layers or not available() or torch.get_num_threads() != 1:
        return None
    extra = sum(m.weight.numel() * 4 for m in layers)
    free = free_memory_bytes() if free_bytes is None else free_bytes
    if free is None or extra > FREE_MEMORY_SHARE * free:
        log.info("fp32 linear layers keep torch's path: a reordered copy (%.1f GB) does not fit in free memory",
                 extra / 1e9)
        return None
    rows = tuple(r for r in ROWS if r <= max_rows) + (ROWS[-1],)
    by_shape: dict[tuple[int, int], list] = {}
    for m in layers:
        by_shape.setdefault(tuple(m.weight.shape), []).append(m)
    faster = 0
    with torch.inference_mode():
        for shape, group in by_shape.items():
            packed = torch.ops.mkldnn._reorder_linear_weight(group[0].weight.detach(), max_rows)
            wins = _time_both(group[0].weight.detach(), packed, rows)
            if not any(wins.values()):
                continue
            for m in group:
                own = packed if m is group[0] else torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), max_rows)
                _install(m, own, wins)
                faster += 1
    if not faster:
        return None
    return f"{faster} of {len(layers)} fp32 linear layers use oneDNN for batched rows (timed at load)"


def _time_both(weight, packed, rows: tuple[int, ...]) -> dict[int, bool]:
    """For each row count: whether oneDNN on the reordered weight beats plain linear (best of 5)."""
    import torch

    wins = {}
    for n in rows:
        x = torch.randn(n, weight.shape[1])
        plain = _best(lambda: torch.nn.functional.linear(x, weight))
        onednn = _best(lambda: _onednn(x, packed, None))
        wins[n] = onednn < 0.95 * plain  # a clear win only: a tie keeps torch's own path
    return wins


def _onednn(x, packed, bias):
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _best(call, repeats: int = 5) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _install(layer, packed, wins: dict[int, bool]) -> None:
    """The layer's forward takes oneDNN for row counts whose nearest timed count at or below won."""
    import torch

    measured = sorted(wins)
    use = [wins[max(r for r in measured if r <= n)] if n >= 1 else False for n in range(measured[-1] + 1)]

    def forward(self, x):
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if (use[rows] if rows < len(use) else use[-1]) and x.dtype == torch.float32 and not x.requires_grad:
            return _onednn(x, packed, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    layer._kit_onednn_weight = packed
    layer.forward = types.MethodType(forward, layer)
