"""Every transformers version difference the kit's own model code depends on, in one place.

The native engine, the server's batching scheduler and the loaders call the Llama model only through
these functions, so the same code runs on every release pyproject.toml accepts (4.38 to 5.x):

| what                         | 4.38                      | 4.46                        | 4.57                    | 5.x                  |
| ---------------------------- | ------------------------- | --------------------------- | ----------------------- | -------------------- |
| forward's KV cache argument  | past_key_values           | past_key_values             | past_key_values         | cache                |
| logits for the last token    | (none: all positions)     | num_logits_to_keep          | logits_to_keep          | logits_to_keep       |
| cache returned               | legacy tuples             | the DynamicCache passed     | the DynamicCache        | the Cache (`.cache`) |
| a cache's K/V                | tuples                    | key_cache / value_cache     | layers[i].keys/values   | layers[i].keys/values|
| a cache of one's own layers  | StaticCache subclass      | Cache subclass              | Cache(layers=...)       | Cache(layers=...)    |
| from_pretrained's dtype      | torch_dtype               | torch_dtype                 | dtype                   | dtype                |
| the attention mask           | max_position_embeddings²  | query x keys                | query x keys            | query x keys         |

The last row is why 4.38 needs more than a renamed keyword: its LlamaModel registers a
max_position_embeddings² bool buffer at construction (1 GiB for InternLM2's 32768) and turns all of it
into two float copies on every forward (8 GiB, seconds per token), however few tokens there are. On
such a release the model is built with that buffer shrunk (the rotary embeddings keep the real
context length, which dynamic NTK scaling reads) and its mask method builds a mask of the tokens at
hand: queries x keys for calls through `forward` here, keys x keys for any other caller (generate).
"""

from __future__ import annotations

import inspect
import types
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def transformers_version():
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__)


def _at_least(text: str) -> bool:
    from packaging.version import Version

    return transformers_version() >= Version(text)


def dtype_kwarg(torch_dtype) -> dict:
    """from_pretrained's dtype keyword: renamed from torch_dtype to dtype in 4.56."""
    return {"dtype" if _at_least("4.56") else "torch_dtype": torch_dtype}


@dataclass(frozen=True)
class Call:
    """How this release's causal-LM forward is called."""

    cache_kw: str  # "cache" (5.x) or "past_key_values"
    keep_kw: str | None  # "logits_to_keep", "num_logits_to_keep" (4.45-4.49), or None (older: every position)
    full_mask: bool  # 4.38-style LlamaModel._update_causal_mask(attention_mask, input_tensor)


@lru_cache(maxsize=8)
def _call_for(model_class) -> Call:
    params = inspect.signature(model_class.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return Call(cache_kw, keep_kw, _has_full_mask())


def call_for(model) -> Call:
    return _call_for(type(model))


def _has_full_mask() -> bool:
    """Whether LlamaModel builds its mask from a max_position_embeddings² buffer (4.38-4.39)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    method = getattr(LlamaModel, "_update_causal_mask", None)
    return method is not None and "cache_position" not in inspect.signature(method).parameters


# --- building and loading --------------------------------------------------------------------

@contextmanager
def small_mask_buffer(config):
    """Build a Llama model inside this block: on a full-mask release its mask buffer is made for one
    position instead of max_position_embeddings (then `fit_to_tokens` the model); elsewhere a no-op."""
    if not _has_full_mask():
        yield
        return
    real = config.max_position_embeddings
    config.max_position_embeddings = 1
    try:
        yield
    finally:
        config.max_position_embeddings = real


def fit_to_tokens(model, context_window: int) -> None:
    """After loading: on a full-mask release, give the config and the rotary embeddings the real
    context length back and replace the model's mask method by one sized to the tokens at hand."""
    if not _has_full_mask():
        return
    import torch

    base = model.model
    real = model.config.max_position_embeddings = int(context_window)
    for layer in base.layers:
        attention = layer.self_attn
        attention.max_position_embeddings = real
        attention.rotary_emb.max_position_embeddings = real  # dynamic NTK scaling reads this
    if base.causal_mask.shape[-1] > 1:  # loaded without small_mask_buffer: free the big one
        base.register_buffer("causal_mask", torch.zeros(1, 1, dtype=torch.bool), persistent=False)
    base._update_causal_mask = types.MethodType(_mask_for_tokens, base)


def _mask_for_tokens(self, attention_mask, input_tensor):
    """4.38's mask method, without the max_position_embeddings² buffer: a prepared 4D mask as is;
    else the causal mask over the keys the 2D mask (or the input) spans, rows indexed by position."""
    import torch

    dtype = input_tensor.dtype
    if attention_mask is not None and attention_mask.dim() == 4:
        return _additive(attention_mask, dtype)
    batch, length = input_tensor.shape[:2]
    if attention_mask is None and length == 1:
        return None  # a decode step: 4.38's attention then attends to every key, as it should
    keys = max(length, attention_mask.shape[-1] if attention_mask is not None else 0)
    allowed = torch.ones(keys, keys, dtype=torch.bool, device=input_tensor.device).tril()[None, None]
    allowed = allowed.expand(batch, 1, keys, keys)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    # A row that may see nothing (left padding) sees everything instead: its output is thrown away,
    # and SDPA gives NaN for an all-masked row.
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return _additive(allowed, dtype)


def _additive(mask, dtype):
    """A bool mask (True: may attend) as the float mask 4.38 adds to attention scores."""
    import torch

    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


# --- the forward pass ------------------------------------------------------------------------

def cache_length(cache) -> int:
    if cache is None:
        return 0
    if isinstance(cache, tuple):  # 4.38's legacy format
        return int(cache[0][0].shape[-2]) if cache else 0
    return int(cache.get_seq_length())


PREFILL_CHUNK = 512  # tokens per forward of a long prompt on a full-mask release


def forward(model, input_ids, cache=None, *, position_ids=None, attention_mask=None):
    """(logits of the last position [batch, vocab], the cache to pass next time).

    `attention_mask`: None (causal over the cache and the new tokens), or a 4D bool mask
    [batch, 1, new tokens, cached + new tokens] (True: may attend).

    On a full-mask release (4.38) a long prompt without a mask of the caller's goes through in
    chunks of PREFILL_CHUNK tokens: its attention takes a float mask and materialises
    heads x queries x keys scores, quadratic in one forward's length (a 9,500-token prompt cost
    1.4 GB more than on 4.46); chunked, that is queries <= PREFILL_CHUNK, as linear as 4.46+.
    """
    import torch

    call = call_for(model)
    new = input_ids.shape[1]
    if call.full_mask and attention_mask is None and new > PREFILL_CHUNK:
        if position_ids is None:
            past = cache_length(cache)
            position_ids = torch.arange(past, past + new, device=input_ids.device)[None]
        for start in range(0, new, PREFILL_CHUNK):
            piece = slice(start, start + PREFILL_CHUNK)
            logits, cache = _forward_once(model, call, input_ids[:, piece], cache, position_ids[:, piece], None)
        return logits, cache
    return _forward_once(model, call, input_ids, cache, position_ids, attention_mask)


def _forward_once(model, call, input_ids, cache, position_ids, attention_mask):
    import torch

    kwargs = {call.cache_kw: cache, "use_cache": True}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    # On a full-mask release one new token without a caller's mask sees every cached one: it gets no
    # mask at all (see _mask_for_tokens); everything else gets the float mask of its rows.
    decode_step = attention_mask is None and input_ids.shape[1] == 1
    if call.full_mask and not decode_step:
        past, new = cache_length(cache), input_ids.shape[1]
        device = input_ids.device
        if attention_mask is None:
            columns = torch.arange(past + new, device=device)
            attention_mask = (columns[None, :] <= torch.arange(past, past + new, device=device)[:, None])[None, None]
        if position_ids is None:
            kwargs["position_ids"] = torch.arange(past, past + new, device=device)[None]
        # 4.38's attention picks mask rows by cache_position; the mask built here has one row per new token.
        kwargs["cache_position"] = torch.arange(new, device=device)
        kwargs["attention_mask"] = _additive(attention_mask, model.dtype)
    elif attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if call.keep_kw:
        out = model(input_ids=input_ids, **{call.keep_kw: 1}, **kwargs)
        logits = out.logits[:, -1, :]
        new_cache = getattr(out, "cache", None) if call.cache_kw == "cache" else out.past_key_values
    else:  # no way to ask for the last position only: run the body, then the head on one position
        out = model.model(input_ids=input_ids, **kwargs)
        logits = model.lm_head(out.last_hidden_state[:, -1:, :])[:, -1, :]
        new_cache = out.past_key_values
    return logits, new_cache


# --- caches ----------------------------------------------------------------------------------

def new_cache(model):
    """An empty dynamic cache for `model` (5.x wants the config; 4.x takes none)."""
    from transformers.cache_utils import DynamicCache

    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()


def layer_tensors(cache) -> list[tuple]:
    """Each layer's (keys, values), [batch, kv_heads, length, head_dim], from any release's cache."""
    if isinstance(cache, tuple):
        return [(k, v) for k, v in cache]
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def cache_of_layers(layers):
    """A transformers Cache over the caller's own layer objects, each with `update(keys, values)`,
    `get_seq_length()` and `length` (the model calls only update and the length queries)."""
    from transformers.cache_utils import Cache

    if "layers" in inspect.signature(Cache.__init__).parameters:  # 4.56+: caches are lists of layers
        cache = Cache.__new__(Cache)
        Cache.__init__(cache, layers=layers)
        return cache
    return _layer_list_cache_class()(layers)


@lru_cache(maxsize=1)
def layer_cache_masks_itself() -> bool:
    """Whether a `cache_of_layers` cache may go without an attention mask (no padding): before 4.56
    it is the kit's own Cache class, whose get_seq_length the model's causal masking reads; 4.56+
    caches ask each layer its type first, and there the caller passes its mask."""
    from transformers.cache_utils import Cache

    return "layers" not in inspect.signature(Cache.__init__).parameters


@lru_cache(maxsize=1)
def _layer_list_cache_class():
    from transformers.cache_utils import Cache, StaticCache

    # 4.38 converts every cache that is not a StaticCache through from_legacy_cache (a copy into a
    # new DynamicCache); the subclass only passes that isinstance test and inherits nothing it uses.
    base = StaticCache if _has_full_mask() else Cache

    class LayerListCache(base):
        def __init__(self, layers):
            Cache.__init__(self)  # 4.46's Cache is an nn.Module
            self.layer_list = layers

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            return self.layer_list[layer_idx].update(key_states, value_states)

        def get_seq_length(self, layer_idx=0):
            return self.layer_list[layer_idx].length

        def get_usable_length(self, new_seq_length, layer_idx=0):
            return self.get_seq_length(layer_idx)

        def get_max_length(self):
            return None

        def get_max_cache_shape(self):
            return None

        @property
        def seen_tokens(self):
            return self.get_seq_length()

        def to_legacy_cache(self):
            return self

        def __len__(self):
            return len(self.layer_list)

    return LayerListCache


def static_cache(model, max_cache_len: int):
    """transformers' StaticCache for `model` (batch 1), spelled as this release wants it."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kwargs = {"config": model.config, "max_cache_len": max_cache_len}
    for name in ("max_batch_size", "batch_size"):
        if name in params:
            kwargs[name] = 1
    if "device" in params:
        kwargs["device"] = model.device
    if "dtype" in params:
        kwargs["dtype"] = model.dtype
    return StaticCache(**kwargs)
