"""InternLM2's sentencepiece tokenizer as a standard fast tokenizer whose chat tokens keep their ids.

The hub repo ships `tokenizer.model` (sentencepiece) whose last six pieces are spelled
`[UNUSED_TOKEN_141]`..`[UNUSED_TOKEN_146]`; tokenizer_config.json's `added_tokens_decoder` renames
them `<|plugin|>`..`<|im_start|>`. Loaded naively on transformers 5.x, those names become *new*
tokens with ids past the embedding table. Instead we let transformers convert tokenizer.model as a
plain `LlamaTokenizer` (its conversion gives sentencepiece's ids; `LlamaTokenizerFast(vocab_file=)`
silently builds an empty tokenizer on 5.24), then rename the existing pieces in the resulting
tokenizer.json and mark them special. Every renamed id is verified before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from setup_kit.errors import KitError, ModelFolderError

def read_tokenizer_config(folder: Path) -> dict:
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelFolderError(f"{path} is not valid JSON ({exc}).",
                               f"Download it again, or check it with internlm-kit doctor --model {folder}")


def renamed_pieces(config: dict, vocab_size: int) -> dict[int, str]:
    """{id: name} for tokens that tokenizer_config.json names and that exist in the vocabulary."""
    decoder = config.get("added_tokens_decoder") or {}
    renames = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str) and key.isdigit() and int(key) < vocab_size:
            renames[int(key)] = content
    return renames


def _convert_sentencepiece(model_file: Path):
    """transformers' own conversion of tokenizer.model, as a `tokenizers.Tokenizer`."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="internlm-kit-tok-") as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
             "add_eos_token": False}))
        try:
            slow_or_fast = AutoTokenizer.from_pretrained(tmp)
        except Exception as exc:  # sentencepiece/protobuf missing, or a damaged model file
            raise ModelFolderError(
                f"tokenizer.model could not be converted to a fast tokenizer: {exc}",
                "Check that sentencepiece and protobuf are installed (internlm-kit doctor) and "
                "that tokenizer.model is not a git-lfs pointer.") from exc
    backend = getattr(slow_or_fast, "backend_tokenizer", None)
    if backend is None:
        raise KitError("transformers did not produce a fast tokenizer from tokenizer.model.",
                       "Install tokenizers and sentencepiece: internlm-kit doctor says which is missing.")
    return backend


def _rename(tokenizer_json: dict, renames: dict[int, str]) -> dict:
    """Rename vocabulary entries by id and list them as special added tokens with the same ids."""
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    by_id = {i: piece for piece, i in vocab.items()}
    added = [t for t in tokenizer_json.get("added_tokens", []) if t["id"] not in renames]
    for token_id, name in sorted(renames.items()):
        old = by_id.get(token_id)
        if old is None:
            raise KitError(f"the tokenizer has no piece with id {token_id} to rename to {name!r}.",
                           "The tokenizer files do not belong together; download them again.")
        if old != name:
            if name in vocab and vocab[name] != token_id:
                raise KitError(f"{name!r} is already piece {vocab[name]} and cannot also be {token_id}.",
                               "The tokenizer files do not belong together; download them again.")
            del vocab[old]
            vocab[name] = token_id
        added.append({"id": token_id, "content": name, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    tokenizer_json["added_tokens"] = sorted(added, key=lambda t: t["id"])
    return tokenizer_json


def read_model_proto(model_file: Path):
    """tokenizer.model's ModelProto, for the settings transformers' conversion does not carry over.

    Unreadable settings are an error, not a guess: sentencepiece's default (a dummy prefix) is the
    opposite of InternLM2's file, and guessing it would silently change every text's first token
    and drop the first space of every reply.
    """
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        proto = import_protobuf().ModelProto()
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as exc:  # protobuf missing or broken, or a damaged file
        raise ModelFolderError(
            f"the settings of {model_file} (whether it adds a leading space to a text) could not be "
            f"read: {exc}",
            "Install protobuf (pip install protobuf) and check that tokenizer.model is not a git-lfs "
            "pointer: internlm-kit doctor says which.") from exc
    return proto


# Bumped whenever the tokenizer.json this module writes changes, so cached copies are rebuilt.
TOKENIZER_FORMAT = 2
# The sentencepiece the kit installs (0.2.3; 0.2.0 did not yet) never emits a NORMAL piece "\x00" when
# byte fallback is on: it warns and encodes the character as <0x00> (the real file's piece is id 354),
# and llama.cpp's converter marks that piece unused. The fast vocabulary gets it under this name, which
# no text spells, so encoding falls back to <0x00> too, and decoding the id still gives "\x00".
NUL_PIECE = "<unused-0x00>"


def _unused_nul(proto) -> bool:
    return proto.trainer_spec.byte_fallback and any(
        p.piece == "\x00" and p.type == p.NORMAL for p in proto.pieces)


def _whole_text_normalization(tokenizer_json: dict, dummy_prefix: bool, *, unused_nul: bool = False) -> dict:
    """Spaces become '▁', and the dummy prefix (when tokenizer.model has one) goes only at the very
    start of the text, as sentencepiece does on the whole string; the same pipeline on every
    `tokenizers` release. Decoding gives back what sentencepiece's decode does.

    transformers 4.38 converts with a `Prepend('▁')` normalizer, which `tokenizers` applies to each
    stretch between special tokens (`<|im_start|>▁user`, `<|im_end|>▁\\n`); 5.x uses a
    `Metaspace(prepend_scheme='first', split=False)` pre-tokenizer, but tokenizers 0.15 cannot turn
    its split off (so runs of spaces could not become whitespace pieces). Instead every added token
    is matched after normalization (`normalized: true`), so the normalizer sees the whole text at
    once; a text that starts with an added token loses the prefix again (5.x adds none there), and
    that rule also leaves the added tokens' own spelling unchanged. A text that starts with a space
    gets no prefix either, as with 5.x's Metaspace (sentencepiece itself would add one).

    InternLM2's tokenizer.model has no dummy prefix: then nothing is prepended, and the decoder
    strips nothing either (transformers' conversion leaves a `Strip` that turns " lead" into "lead",
    where sentencepiece's decode gives " lead").
    """
    import re

    steps = [n for n in _flatten_normalizers(tokenizer_json.get("normalizer"))
             if n.get("type") == "Precompiled" and n.get("precompiled_charsmap")]
    added = sorted({t["content"] for t in tokenizer_json.get("added_tokens", [])}, key=len, reverse=True)
    if dummy_prefix:
        steps.append({"type": "Prepend", "prepend": "\u2581"})
    steps.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    if dummy_prefix and added:
        lookahead = "|".join(re.escape(t) for t in added)
        steps.append({"type": "Replace", "pattern": {"Regex": f"\\A\u2581(?={lookahead})"}, "content": ""})
    if dummy_prefix:
        # Like 5.x's Metaspace, no prefix when the text already starts with a space.
        steps.append({"type": "Replace", "pattern": {"Regex": "\\A\u2581\u2581"}, "content": "\u2581"})
    tokenizer_json["normalizer"] = {"type": "Sequence", "normalizers": steps}
    tokenizer_json["pre_tokenizer"] = None
    for token in tokenizer_json.get("added_tokens", []):
        token["normalized"] = True
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}]
    vocab = tokenizer_json["model"]["vocab"]
    if unused_nul and "\x00" in vocab:
        if NUL_PIECE in vocab:
            raise KitError(f"tokenizer.model already has a piece {NUL_PIECE!r}.",
                           "Report this with the output of internlm-kit doctor.")
        vocab[NUL_PIECE] = vocab.pop("\x00")
        decoders.append({"type": "Replace", "pattern": {"String": NUL_PIECE}, "content": "\x00"})
    decoders += [{"type": "ByteFallback"}, {"type": "Fuse"}]
    if dummy_prefix:  # sentencepiece's decode drops the prefix it added
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    tokenizer_json["decoder"] = {"type": "Sequence", "decoders": decoders}
    return tokenizer_json


def _flatten_normalizers(normalizer: dict | None) -> list[dict]:
    if not normalizer:
        return []
    if normalizer.get("type") == "Sequence":
        return [n for inner in normalizer.get("normalizers", []) for n in _flatten_normalizers(inner)]
    return [normalizer]


def add_dummy_prefix(proto) -> bool:
    """Whether sentencepiece puts a '▁' before a text (InternLM2's file: no)."""
    return bool(proto.normalizer_spec.add_dummy_prefix)


def build_fast_tokenizer(folder: Path):
    """A `PreTrainedTokenizerFast` for an InternLM2 (or Llama-with-tokenizer.model) folder.

    Ids equal sentencepiece's; the pieces tokenizer_config.json renames keep their ids, as special
    tokens; the chat template and special tokens come from tokenizer_config.json.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise ModelFolderError(f"{folder} has no tokenizer.model to build the tokenizer from.",
                               f"Download the tokenizer files again; see internlm-kit doctor --model {folder}")
    config = read_tokenizer_config(folder)
    backend = _convert_sentencepiece(model_file)
    vocab_size = backend.get_vocab_size(with_added_tokens=False)
    renames = renamed_pieces(config, vocab_size)
    data = _rename(json.loads(backend.to_str()), renames)
    proto = read_model_proto(model_file)
    data = _whole_text_normalization(data, add_dummy_prefix(proto), unused_nul=_unused_nul(proto))

    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if isinstance(config.get(k), str)}
    extra = [n for i, n in sorted(renames.items()) if n not in special.values()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        additional_special_tokens=extra, clean_up_tokenization_spaces=False, **special)
    if config.get("chat_template"):
        tokenizer.chat_template = config["chat_template"]
    verify_ids(tokenizer, renames, vocab_size)
    return tokenizer


def verify_ids(tokenizer, renames: dict[int, str], vocab_size: int) -> None:
    """Each renamed token encodes to its own id, and no token lies past the vocabulary."""
    for token_id, name in renames.items():
        got = tokenizer.convert_tokens_to_ids(name)
        encoded = tokenizer.encode(name, add_special_tokens=False)
        if got != token_id or encoded != [token_id]:
            raise KitError(f"the converted tokenizer gives {name!r} id {got} (encodes as {encoded}), "
                           f"not {token_id}.", "Report this with the output of internlm-kit doctor.")
    if len(tokenizer) > vocab_size:
        raise KitError(f"the converted tokenizer has {len(tokenizer)} tokens, more than the "
                       f"{vocab_size} pieces of tokenizer.model: extra ids would lie past the "
                       "embedding table.", "Report this with the output of internlm-kit doctor.")


def write_tokenizer(src: Path, dst: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into `dst`.

    tokenizer.model goes along too (llama.cpp's converter reads it, and takes the chat tokens'
    names from `added_tokens_decoder`).
    """
    tokenizer = build_fast_tokenizer(src)
    tokenizer.save_pretrained(str(dst))
    shutil.copyfile(Path(src) / "tokenizer.model", Path(dst) / "tokenizer.model")
    _write_portable_merges(Path(dst) / "tokenizer.json")
    # Name a class every transformers release has, so older stacks and vLLM load tokenizer.json as is.
    config_path = Path(dst) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("auto_map", None)
    # What tokenizer.model does with a leading space, in the key llama.cpp's converter (and
    # transformers' own tokenizer classes) read: without it they assume a '▁' before every text.
    config["add_prefix_space"] = add_dummy_prefix(read_model_proto(Path(src) / "tokenizer.model"))
    # Older transformers, vLLM and llama.cpp read these keys rather than chat_template.jinja /
    # extra_special_tokens, which transformers 5 writes.
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    special = [t for t in tokenizer.added_tokens_decoder.values()]
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                 "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    config["additional_special_tokens"] = [
        t.content for t in special if t.special and t.content not in
        (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token)]
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def _write_portable_merges(path: Path) -> None:
    """BPE merges as "a b" strings, the form every `tokenizers` release reads.

    tokenizers >= 0.20 saves merges as ["a", "b"] pairs, which 0.15 (the tutorial profile's, under
    transformers 4.38) rejects with "data did not match any variant of untagged enum ModelWrapper".
    sentencepiece pieces never contain a space (it is '▁'), so the string form is unambiguous; should
    a piece contain one, the file is left as saved.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data.get("model", {}).get("merges")
    if not merges or not all(isinstance(m, list) for m in merges):
        return
    if any(" " in part for m in merges for part in m):
        return
    data["model"]["merges"] = [" ".join(m) for m in merges]
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def load_tokenizer(folder: Path, cache_root: Path | None = None):
    """The tokenizer for a model folder: as is when it has tokenizer.json, else built (and cached)."""
    folder = Path(folder)
    # A tokenizer.json beside remote tokenizer code (saved by the remote code's fast tokenizer)
    # is not trusted: tokenizer.model is the source, as in the hub repo.
    remote = bool(read_tokenizer_config(folder).get("auto_map"))
    if (folder / "tokenizer.json").is_file() and not (remote and (folder / "tokenizer.model").is_file()):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    if cache_root is None:
        return build_fast_tokenizer(folder)
    from importlib.metadata import version

    digest = hashlib.sha256()
    # One cache entry per stack: a tokenizer.json written by a newer `tokenizers` may not parse
    # in an older one (two environments, say the tutorial's and the kit's, share the state dir).
    digest.update(f"transformers={version('transformers')} tokenizers={version('tokenizers')} "
                  f"format={TOKENIZER_FORMAT}".encode())
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    cached = Path(cache_root) / digest.hexdigest()[:16]
    if not (cached / "tokenizer.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=_ensure(cache_root)))
        try:
            write_tokenizer(folder, tmp)
            tmp.rename(cached)
        except OSError:  # another process won the race, or the cache is not writable
            shutil.rmtree(tmp, ignore_errors=True)
            if not (cached / "tokenizer.json").is_file():
                return build_fast_tokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(cached))


def _ensure(path: Path) -> Path:
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)
