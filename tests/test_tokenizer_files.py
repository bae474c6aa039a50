"""The kit's fast tokenizer is sentencepiece: same ids, same decoded text, on the real file's settings.

The fixture's tokenizer.model is laid out like the hub's (normalizer `identity`, no dummy prefix,
extra whitespace kept, BPE with byte fallback and split digits, NORMAL pieces for control
characters with "\\x00" among them, USER_DEFINED `[UNUSED_TOKEN_*]` pieces last). The chat tokens
are renamed by tokenizer_config.json, so texts spell them by name for the kit and by piece for
sentencepiece.
"""

from __future__ import annotations

import json

import pytest

from fixtures.models import CHAT_TOKENS, UNUSED_PIECES

TEXTS = [
    " lead", "  two", "   ", " ", "trailing  ", "a  b   c", "line\n  indented\n\n",
    "12345 and 2024-12-02", "你好，世界！书生·浦语", " 你好", "emoji 🙂 and 龘",
    "tab\there\x01ctl\x1f", "\x00", "a\x00b", " \x00 ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    " <|im_end|> after a space", "[UNUSED_TOKEN_131] stays one piece",
]


def as_pieces(text: str) -> str:
    for name, piece in zip(CHAT_TOKENS, UNUSED_PIECES):
        text = text.replace(name, piece)
    return text


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir):
    from setup_kit.tokenizer_files import load_tokenizer

    return load_tokenizer(tiny_internlm2_dir)


def test_the_fixture_has_the_real_files_settings_and_layout(tiny_internlm2_dir, tiny_sentencepiece):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString((tiny_internlm2_dir / "tokenizer.model").read_bytes())
    spec = proto.normalizer_spec
    assert (spec.name, spec.add_dummy_prefix, spec.remove_extra_whitespaces) == ("identity", False, False)
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
    assert proto.trainer_spec.model_type == model_pb2.TrainerSpec.BPE
    Piece = model_pb2.ModelProto.SentencePiece
    assert [p.type for p in proto.pieces[3:259]] == [Piece.BYTE] * 256
    assert proto.pieces[354].piece == "\x00" and proto.pieces[354].type == Piece.NORMAL
    assert tiny_sentencepiece.encode("\x00") == [3]  # sentencepiece 0.2 treats that piece as unused
    size = len(proto.pieces)
    assert [p.piece for p in proto.pieces[size - 6:]] == UNUSED_PIECES
    assert proto.pieces[-7].type == Piece.USER_DEFINED == proto.pieces[-1].type


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_decoded_text_equal_sentencepiece(tokenizer, tiny_sentencepiece, text):
    ids = tiny_sentencepiece.encode(as_pieces(text))
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    assert as_pieces(tokenizer.decode(ids)) == tiny_sentencepiece.decode(ids)
    assert tokenizer.decode(ids) == text


def test_the_chat_tokens_are_the_last_six_ids(tokenizer, tiny_sentencepiece):
    size = tiny_sentencepiece.get_piece_size()
    assert tokenizer.convert_tokens_to_ids(CHAT_TOKENS) == list(range(size - 6, size))
    assert len(tokenizer) == size


def test_the_converted_folder_says_no_space_is_added(tiny_llama_dir):
    """llama.cpp's converter reads add_prefix_space (absent means a "▁" before every segment)."""
    config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    assert config["add_prefix_space"] is False
    data = json.loads((tiny_llama_dir / "tokenizer.json").read_text())
    text = json.dumps([data["normalizer"], data["pre_tokenizer"], data["decoder"]])
    assert "Prepend" not in text and "Metaspace" not in text and "Strip" not in text


def test_an_unreadable_dummy_prefix_flag_is_an_error_not_a_guess(tmp_path):
    from setup_kit.errors import ModelFolderError
    from setup_kit.tokenizer_files import read_model_proto

    (tmp_path / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelFolderError, match="leading space"):
        read_model_proto(tmp_path / "tokenizer.model")
