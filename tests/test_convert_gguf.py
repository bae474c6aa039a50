"""llama.cpp's `convert_hf_to_gguf.py` on the folder `internlm-kit convert` writes: the GGUF's tokenizer is
sentencepiece's.

The converter and its `gguf` package are the Python files vendored in the llama-cpp-python sdist
(fixtures.llama_cpp_sdist), run as users run them. Tokenizing with the GGUF needs llama.cpp's C++ library,
which is not built here; what its SPM tokenizer does is decided by the metadata checked below: no "▁"
before a text (`add_space_prefix` false, where a missing key means one is added: the bug of issue 13, 0
of 21 texts right), the pieces and scores of tokenizer.model at their ids, and token types that make the
chat tokens whole special tokens.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fixtures.faithful_tokenizer import (  # noqa: F401  (session fixtures)
    USER_PIECES, faithful_internlm2_dir, faithful_llama_dir, faithful_sentencepiece)
from fixtures.llama_cpp_sdist import gguf_module, llama_cpp_tools  # noqa: F401
from fixtures.models import CHAT_TEMPLATE, CHAT_TOKENS

pytestmark = pytest.mark.slow  # the first run downloads the sdist (77 MB); every run imports torch twice


@pytest.fixture(scope="module")
def gguf_tokenizer(llama_cpp_tools, faithful_llama_dir, tmp_path_factory) -> dict:
    """The tokenizer.* fields of the GGUF llama.cpp's converter makes from the converted folder."""
    out = tmp_path_factory.mktemp("gguf") / "model-f32.gguf"
    run = subprocess.run([sys.executable, str(llama_cpp_tools / "convert_hf_to_gguf.py"), str(faithful_llama_dir),
                          "--outfile", str(out), "--outtype", "f32"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    reader = gguf_module(llama_cpp_tools).GGUFReader(out)
    assert reader.get_field("general.architecture").contents() == "llama"
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


def test_no_space_is_added_before_a_text(gguf_tokenizer):
    assert gguf_tokenizer["tokenizer.ggml.model"] == "llama"  # llama.cpp's sentencepiece (SPM) tokenizer
    assert gguf_tokenizer["tokenizer.ggml.add_space_prefix"] is False


def test_the_pieces_and_scores_are_those_of_tokenizer_model(gguf_tokenizer, faithful_sentencepiece):
    sp = faithful_sentencepiece
    size = sp.get_piece_size()
    expected = [sp.id_to_piece(i) for i in range(size - 6)] + CHAT_TOKENS  # renamed by tokenizer_config.json
    assert gguf_tokenizer["tokenizer.ggml.tokens"] == expected
    scores = gguf_tokenizer["tokenizer.ggml.scores"]
    # The merges llama.cpp ranks: every piece a text can be merged into keeps sentencepiece's score.
    normal = [i for i in range(size) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
                                             or sp.is_byte(i) or sp.id_to_piece(i).startswith("[UNUSED_TOKEN_"))]
    assert len(normal) > 300
    assert [scores[i] for i in normal] == pytest.approx([sp.get_score(i) for i in normal])


def test_token_types_make_chat_tokens_special_and_bytes_bytes(gguf_tokenizer, faithful_sentencepiece):
    sp = faithful_sentencepiece
    size = sp.get_piece_size()
    types = gguf_tokenizer["tokenizer.ggml.token_type"]
    # gguf's TokenType: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6
    assert [types[i] for i in range(size - 6, size)] == [3] * 6  # <|plugin|> .. <|im_start|>: CONTROL
    assert types[1] == types[2] == 3  # <s>, </s>
    assert types[3:259] == [6] * 256 and [sp.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]
    # The other [UNUSED_TOKEN_*] stay whole pieces, as sentencepiece's USER_DEFINED pieces are.
    user = list(range(size - len(USER_PIECES), size - 6))
    assert [sp.id_to_piece(i) for i in user] == USER_PIECES[:-6] and {types[i] for i in user} == {4}
    assert types[354] == 5 and sp.is_unused(354)  # "\x00": unused, as sentencepiece 0.2.3 has it
    words = [i for i in range(259, size - len(USER_PIECES)) if i != 354]
    assert {types[i] for i in words} == {1}


def test_special_ids_and_the_chat_template(gguf_tokenizer, faithful_sentencepiece):
    assert gguf_tokenizer["tokenizer.ggml.bos_token_id"] == 1
    assert gguf_tokenizer["tokenizer.ggml.eos_token_id"] == 2
    assert gguf_tokenizer["tokenizer.ggml.add_bos_token"] is True
    assert gguf_tokenizer["tokenizer.chat_template"] == CHAT_TEMPLATE
    # llama.cpp ends a reply at <|im_end|> too: it takes that CONTROL token's text as end-of-turn.
    im_end = gguf_tokenizer["tokenizer.ggml.tokens"].index("<|im_end|>")
    assert im_end == faithful_sentencepiece.get_piece_size() - 2
