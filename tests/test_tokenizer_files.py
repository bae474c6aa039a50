"""The kit's fast tokenizer, and the one `convert` writes, are sentencepiece: same ids, same decoded text.

On a tokenizer.model set up as the hub's (fixtures.faithful_tokenizer: normalizer `identity`, no dummy
prefix, extra whitespace kept, BPE with byte fallback and split digits, NORMAL pieces for control
characters with "\\x00" among them, USER_DEFINED `[UNUSED_TOKEN_*]` pieces last), sentencepiece itself is
the oracle. The chat tokens are renamed by tokenizer_config.json, so texts spell them by name for the
kit and transformers, and by piece for sentencepiece.
"""

from __future__ import annotations

import json

import pytest

from fixtures.faithful_tokenizer import (  # noqa: F401  (session fixtures)
    faithful_internlm2_dir, faithful_llama_dir, faithful_sentencepiece)
from fixtures.models import CHAT_TEMPLATE, CHAT_TOKENS, UNUSED_PIECES

TEXTS = [
    " lead", "  two", "   ", " ", "trailing  ", "a  b   c", "line\n  indented\n\n",
    "12345 and 2024-12-02", "你好，世界！书生·浦语", " 你好", "emoji 🙂 and 龘",
    "tab\there\x01ctl\x1f", "\x00", "a\x00b", " \x00 ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|>\n", "<|im_end|>\n\n<|im_start|>", " <|im_end|> after a space",
    "[UNUSED_TOKEN_131] stays one piece",
]


def as_pieces(text: str) -> str:
    for name, piece in zip(CHAT_TOKENS, UNUSED_PIECES):
        text = text.replace(name, piece)
    return text


@pytest.fixture(scope="module")
def kit_tokenizer(faithful_internlm2_dir, tmp_path_factory):
    """What chat and serve decode with: built from tokenizer.model and cached, as the native engine does."""
    from setup_kit.tokenizer_files import load_tokenizer

    return load_tokenizer(faithful_internlm2_dir, cache_root=tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def converted_tokenizer(faithful_llama_dir):
    """What transformers (and vLLM, which loads it through transformers) read from the converted folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(faithful_llama_dir)


@pytest.fixture(params=["kit", "converted"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def test_the_fixture_has_the_real_files_settings_and_layout(faithful_internlm2_dir, faithful_sentencepiece):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString((faithful_internlm2_dir / "tokenizer.model").read_bytes())
    spec = proto.normalizer_spec
    assert (spec.name, spec.add_dummy_prefix, spec.remove_extra_whitespaces) == ("identity", False, False)
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
    assert proto.trainer_spec.model_type == model_pb2.TrainerSpec.BPE
    Piece = model_pb2.ModelProto.SentencePiece
    assert [p.type for p in proto.pieces[3:259]] == [Piece.BYTE] * 256
    assert proto.pieces[354].piece == "\x00" and proto.pieces[354].type == Piece.NORMAL  # as in the real file
    assert faithful_sentencepiece.encode("\x00") == [3]  # sentencepiece 0.2 treats that piece as unused
    size = len(proto.pieces)
    assert [p.piece for p in proto.pieces[size - 6:]] == UNUSED_PIECES
    assert proto.pieces[-16].type == Piece.USER_DEFINED == proto.pieces[-1].type


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_decoded_text_equal_sentencepiece(tokenizer, faithful_sentencepiece, text):
    ids = faithful_sentencepiece.encode(as_pieces(text))
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    assert as_pieces(tokenizer.decode(ids)) == faithful_sentencepiece.decode(ids)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", [" lead", "  two"])
def test_a_reply_that_starts_with_spaces_keeps_them(tokenizer, faithful_sentencepiece, text):
    """The issue's cases: transformers' own conversion decoded them as "lead" and " two"."""
    assert faithful_sentencepiece.decode(faithful_sentencepiece.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text  # after <s>


def test_a_chat_prompt_is_tokenized_as_sentencepiece_does(tokenizer, faithful_sentencepiece):
    messages = [{"role": "system", "content": " You are InternLM."},
                {"role": "user", "content": "Hello,  你好\n two"},
                {"role": "assistant", "content": " Hi!"}, {"role": "user", "content": "🙂"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == ("<s><|im_start|>system\n You are InternLM.<|im_end|>\n<|im_start|>user\nHello,  你好\n"
                      " two<|im_end|>\n<|im_start|>assistant\n Hi!<|im_end|>\n<|im_start|>user\n🙂<|im_end|>\n"
                      "<|im_start|>assistant\n")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids == [1] + faithful_sentencepiece.encode(as_pieces(prompt[len("<s>"):]))
    newline = faithful_sentencepiece.piece_to_id("\n")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(ids[i + 1] == newline for i, t in enumerate(ids) if t == im_end)  # "\n", not "▁\n"


def test_the_chat_tokens_keep_the_last_six_ids(tokenizer, faithful_sentencepiece):
    size = faithful_sentencepiece.get_piece_size()
    assert tokenizer.convert_tokens_to_ids(CHAT_TOKENS) == list(range(size - 6, size))
    assert len(tokenizer) == size


def test_the_converted_folder_says_no_space_is_added(faithful_llama_dir):
    """llama.cpp's converter reads add_prefix_space (absent: a "▁" before every text segment)."""
    config = json.loads((faithful_llama_dir / "tokenizer_config.json").read_text())
    assert config["add_prefix_space"] is False
    assert config["chat_template"] == CHAT_TEMPLATE
    data = json.loads((faithful_llama_dir / "tokenizer.json").read_text())
    steps = json.dumps([data["normalizer"], data["pre_tokenizer"], data["decoder"]])
    assert "Prepend" not in steps and "Metaspace" not in steps and "Strip" not in steps


# --- a tokenizer.model that does add a dummy prefix (the shared tiny model's) ----------------------

def test_a_model_with_a_dummy_prefix_says_so_and_decodes_as_sentencepiece_does(tiny_llama_dir, tiny_sentencepiece):
    from transformers import AutoTokenizer

    assert tiny_sentencepiece.encode("a", out_type=str)[0].startswith("\u2581")  # it really adds one
    config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    assert config["add_prefix_space"] is True
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for text in [" lead", "  two", "lead", "a  b", "   "]:
        ids = tiny_sentencepiece.encode(text)  # "▁" + the text: sentencepiece's decode drops that "▁" again
        assert tokenizer.decode(ids) == tiny_sentencepiece.decode(ids) == text


def test_an_unreadable_dummy_prefix_flag_is_an_error_not_a_guess(tmp_path):
    from setup_kit.errors import ModelFolderError
    from setup_kit.tokenizer_files import read_model_proto

    (tmp_path / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelFolderError, match="leading space") as raised:
        read_model_proto(tmp_path / "tokenizer.model")
    assert "protobuf" in raised.value.fix and "git-lfs" in raised.value.fix
