"""The incremental decoder: streamed text never shows a broken character and never loses one.

InternLM2's tokenizer falls back to bytes for characters it has no piece for, so one CJK character
or emoji can be three or four tokens. The tutorial's `stream_chat` decoded one token at a time and
printed U+FFFD halves. These tests feed the tiny model's real tokenizer (byte fallback, like the
real one) token by token.
"""

from __future__ import annotations

import random

import pytest

from setup_kit.decoding import MAX_HELD_TOKENS, REPLACEMENT, IncrementalDecoder

# Characters the tiny tokenizer has no piece for: they come out as 3 or 4 byte tokens each.
RARE = "龘𠀀🙂🎉é"
TEXTS = [
    "你好，世界！",
    "Hello 🙂 world 🎉!",
    "书生·浦语 says 龘 and 𠀀 twice: 龘𠀀",
    "two  spaces,   three inside, trailing  ",
    "emoji only: 👩‍💻🇨🇳",
    "mixed 中文 and English, café, naïve, 123 4567",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir):
    from setup_kit.tokenizer_files import load_tokenizer

    return load_tokenizer(tiny_internlm2_dir)


def stream(tokenizer, ids) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


def byte_ids(tokenizer, data: bytes) -> list[int]:
    return tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in data])


def test_the_tokenizer_really_splits_these_characters_over_byte_tokens(tokenizer):
    for ch in RARE:
        ids = tokenizer.encode(ch, add_special_tokens=False)
        pieces = tokenizer.convert_ids_to_tokens(ids)
        assert sum(p.startswith("<0x") for p in pieces) == len(ch.encode()), (ch, pieces)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_add_up_to_the_text_with_no_broken_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text == tokenizer.decode(ids)
    assert not any(REPLACEMENT in p for p in pieces)


def test_leading_spaces_decode_as_the_whole_sequence_does(tokenizer):
    # Encoding adds sentencepiece's dummy "▁" and decoding strips it again, so a reply is compared
    # with decoding all of its ids at once, which is what a non-streaming reply would show.
    ids = tokenizer.encode("  two leading", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == " two leading"
    space = tokenizer.convert_tokens_to_ids("\u2581")
    ids = [space] + tokenizer.encode("a", add_special_tokens=False) + [space, space]
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_a_character_appears_only_when_its_last_byte_arrives(tokenizer):
    ids = tokenizer.encode("a🙂", add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    emitted = [decoder.push(i) for i in ids]
    assert emitted[-1].endswith("🙂")
    assert "".join(emitted[:-1]) == "a"  # nothing of the emoji before its 4th byte


def test_never_valid_bytes_come_out_as_replacement_and_the_rest_is_intact(tokenizer):
    for bad in (b"\xff", b"\x80", b"\xc3\x28", b"\xe4\xbd", b"\xf0\x9f\x99"):
        ids = (tokenizer.encode("ok ", add_special_tokens=False) + byte_ids(tokenizer, bad)
               + tokenizer.encode("你好🙂 end", add_special_tokens=False))
        text = "".join(stream(tokenizer, ids))
        assert text.startswith("ok ") and text.endswith("你好🙂 end"), (bad, text)
        middle = text[len("ok "):-len("你好🙂 end")]
        # "(" is the valid half of b"\xc3\x28"; the space is the dummy prefix of the second encode
        assert REPLACEMENT in middle and set(middle) <= {REPLACEMENT, "(", " "}, (bad, text)
        assert text.replace(REPLACEMENT, "") == reference_text(tokenizer, ids).replace(REPLACEMENT, "")


def test_invalid_bytes_do_not_stall_the_stream(tokenizer):
    decoder = IncrementalDecoder(tokenizer)
    out = [decoder.push(i) for i in byte_ids(tokenizer, b"\xff" * (MAX_HELD_TOKENS + 2))]
    assert REPLACEMENT in "".join(out)  # let out before the reply ends


def test_a_reply_cut_mid_character_ends_in_replacement_characters(tokenizer):
    ids = tokenizer.encode("中文", add_special_tokens=False) + byte_ids(tokenizer, "🙂".encode()[:2])
    text = "".join(stream(tokenizer, ids))
    assert text.startswith("中文") and set(text[2:]) == {REPLACEMENT}  # shown, not dropped


def test_special_tokens_are_not_shown(tokenizer):
    ids = tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(
        "<|im_end|>")]
    assert "".join(stream(tokenizer, ids)) == "hi"


def reference_text(tokenizer, ids) -> str:
    """What the ids spell, decoded independently: pieces to bytes, then Python's UTF-8 decoder."""
    data = b""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    for piece in pieces:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            data += bytes([int(piece[3:5], 16)])
        else:
            data += piece.replace("\u2581", " ").encode()
    text = data.decode("utf-8", errors="replace")
    return text[1:] if text.startswith(" ") else text  # the decoder strips the dummy prefix


def test_random_token_streams_never_drop_a_character(tokenizer):
    rng = random.Random(0)
    # <0x20> is left out: sentencepiece writes spaces as "▁", never as a byte, and a space byte
    # right after broken bytes at the very start of a reply is stripped like a leading space.
    space_byte = tokenizer.convert_tokens_to_ids("<0x20>")
    vocab = [i for i in range(len(tokenizer))
             if i not in tokenizer.all_special_ids and i != space_byte]
    for _ in range(1000):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 24))]
        streamed = "".join(stream(tokenizer, ids))
        expected = reference_text(tokenizer, ids)
        if REPLACEMENT not in expected:
            assert streamed == expected, ids
        else:  # a broken byte run may become one or several U+FFFD, but no real character is lost
            assert streamed.replace(REPLACEMENT, "") == expected.replace(REPLACEMENT, ""), ids


def test_a_newline_byte_after_a_broken_byte_is_kept(tokenizer):
    # The tokenizer's own decode turns the whole byte run b"\xe4\n" into two U+FFFD.
    ids = (tokenizer.encode("line", add_special_tokens=False) + byte_ids(tokenizer, b"\xe4\n")
           + tokenizer.encode("next", add_special_tokens=False))
    text = "".join(stream(tokenizer, ids))
    assert text.startswith("line" + REPLACEMENT + "\n") and text.endswith("next")


def test_a_skipped_special_token_inside_a_byte_run_loses_no_valid_text(tokenizer):
    # Seen on the tiny model: <0xCC> <s> <0x4B>... ; the hidden <s> must neither join the broken
    # byte to the valid ones after it (decoded together they became "��") nor split a valid run.
    bos = tokenizer.convert_tokens_to_ids("<s>")
    ids = byte_ids(tokenizer, b"\xcc") + [bos] + byte_ids(tokenizer, b"K~\x1e")
    assert "".join(stream(tokenizer, ids)) == REPLACEMENT + "K~\x1e"
    smile = byte_ids(tokenizer, "🙂".encode())
    ids = smile[:2] + [bos] + smile[2:] + tokenizer.encode("ok", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids)).endswith("ok")


def test_random_streams_with_special_tokens_in_them_never_drop_a_character(tokenizer):
    rng = random.Random(1)
    space_byte = tokenizer.convert_tokens_to_ids("<0x20>")
    special = list(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special and i != space_byte]
    for _ in range(500):
        ids = [rng.choice(special) if rng.random() < 0.15 else rng.choice(vocab)
               for _ in range(rng.randint(2, 24))]
        streamed = "".join(stream(tokenizer, ids))
        expected = reference_text(tokenizer, [i for i in ids if i not in special])
        assert streamed.replace(REPLACEMENT, "") == expected.replace(REPLACEMENT, ""), ids
