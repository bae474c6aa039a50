"""The incremental decoder: streamed text never shows a broken character and never loses one.

InternLM2's tokenizer falls back to bytes for characters it has no piece for, so one CJK character
or emoji can be three or four tokens. The tutorial's `stream_chat` decoded one token at a time and
printed U+FFFD halves. These tests feed the kit's tokenizer of a tiny model whose tokenizer.model is
set up as the hub's (byte fallback, no dummy prefix, spaces kept: fixtures.faithful_tokenizer) token by
token, and hold what comes out against sentencepiece's own decode of the same ids.
"""

from __future__ import annotations

import random

import pytest

from fixtures.faithful_tokenizer import faithful_internlm2_dir, faithful_sentencepiece  # noqa: F401
from setup_kit.decoding import MAX_HELD_TOKENS, REPLACEMENT, IncrementalDecoder

# Characters the tiny tokenizer has no piece for: they come out as 3 or 4 byte tokens each.
RARE = "龘𠀀🙂🎉é"
TEXTS = [
    "你好，世界！",
    "Hello 🙂 world 🎉!",
    "书生·浦语 says 龘 and 𠀀 twice: 龘𠀀",
    "two  spaces,   three inside, trailing  ",
    " one leading space",
    "   three leading, then\n  two after a newline",
    "\tcontrol\x01characters\x00and a NUL\x1f",
    "emoji only: 👩‍💻🇨🇳",
    "mixed 中文 and English, café, naïve, 123 4567",
]


@pytest.fixture(scope="module")
def tokenizer(faithful_internlm2_dir):
    from setup_kit.tokenizer_files import load_tokenizer

    return load_tokenizer(faithful_internlm2_dir)


@pytest.fixture(scope="module")
def oracle(faithful_sentencepiece, tokenizer):
    """sentencepiece's decode of ids, special tokens left out as the kit's decode leaves them out."""
    special = set(tokenizer.all_special_ids)

    def decode(ids) -> str:
        return faithful_sentencepiece.decode([int(i) for i in ids if i not in special])

    return decode


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
def test_streamed_pieces_add_up_to_the_text_with_no_broken_character(tokenizer, faithful_sentencepiece, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == faithful_sentencepiece.encode(text)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text == tokenizer.decode(ids) == faithful_sentencepiece.decode(ids)
    assert not any(REPLACEMENT in p for p in pieces)


@pytest.mark.parametrize("text", [" lead", "  two", "   ", " ", "\n lead", " 你好", " 🙂 smile"])
def test_leading_spaces_are_kept_as_sentencepiece_keeps_them(tokenizer, faithful_sentencepiece, text):
    # The real tokenizer.model adds no dummy "▁", so nothing may strip a reply's first space: a reply
    # that starts " lead" is shown as " lead", streamed or whole (transformers' Strip gave "lead").
    ids = faithful_sentencepiece.encode(text)
    assert faithful_sentencepiece.decode(ids) == text
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_special_tokens=False) == ids


def test_space_pieces_around_a_word_decode_as_sentencepiece_does(tokenizer, oracle):
    space = tokenizer.convert_tokens_to_ids("\u2581")
    ids = [space] + tokenizer.encode("a", add_special_tokens=False) + [space, space]
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == oracle(ids) == " a  "
    bos = tokenizer.convert_tokens_to_ids("<s>")
    ids = [bos, space, space] + tokenizer.encode("b", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids)) == oracle(ids) == "  b"  # a hidden <s> strips nothing


def test_a_character_appears_only_when_its_last_byte_arrives(tokenizer):
    ids = tokenizer.encode("a🙂", add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    emitted = [decoder.push(i) for i in ids]
    assert emitted[-1].endswith("🙂")
    assert "".join(emitted[:-1]) == "a"  # nothing of the emoji before its 4th byte


def test_never_valid_bytes_come_out_as_replacement_and_the_rest_is_intact(tokenizer, oracle):
    for bad in (b"\xff", b"\x80", b"\xc3\x28", b"\xe4\xbd", b"\xf0\x9f\x99"):
        ids = (tokenizer.encode("ok ", add_special_tokens=False) + byte_ids(tokenizer, bad)
               + tokenizer.encode("你好🙂 end", add_special_tokens=False))
        text = "".join(stream(tokenizer, ids))
        assert text.startswith("ok ") and text.endswith("你好🙂 end"), (bad, text)
        middle = text[len("ok "):-len("你好🙂 end")]
        # "(" is the valid half of b"\xc3\x28"
        assert REPLACEMENT in middle and set(middle) <= {REPLACEMENT, "("}, (bad, text)
        assert text.replace(REPLACEMENT, "") == oracle(ids).replace(REPLACEMENT, "")


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


def test_random_token_streams_never_drop_a_character(tokenizer, oracle):
    rng = random.Random(0)
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    for _ in range(1000):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 24))]
        streamed = "".join(stream(tokenizer, ids))
        expected = oracle(ids)
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


def test_random_streams_with_special_tokens_in_them_never_drop_a_character(tokenizer, oracle):
    rng = random.Random(1)
    special = list(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    for _ in range(500):
        ids = [rng.choice(special) if rng.random() < 0.15 else rng.choice(vocab)
               for _ in range(rng.randint(2, 24))]
        streamed = "".join(stream(tokenizer, ids))
        expected = oracle(ids)
        assert streamed.replace(REPLACEMENT, "") == expected.replace(REPLACEMENT, ""), ids
