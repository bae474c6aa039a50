"""response_format (json_object, json_schema) is honoured by constrained decoding (xgrammar), not ignored.

The tiny model has random weights, so whatever it writes under a grammar is the grammar's doing: a
reply that ends ("stop") must parse and validate against the schema; one cut by max_tokens says
"length". A constrained request's mask touches its own row of logits only: an unconstrained request
batched beside it gets the very answer it gets alone. What xgrammar cannot compile is a 400 in words.
"""

from __future__ import annotations

import json
import math
import sys
import threading

import jsonschema
import openai
import pytest
from fixtures.servers import KIT_MODEL
from test_serve_prompt import real_layout_tokenizer  # noqa: F401 - the 92544-piece fixture

ASK = [{"role": "system", "content": ""}, {"role": "user", "content": "The weather, as JSON"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "sunny": {"type": "boolean"},
        "celsius": {"type": "integer", "minimum": -50, "maximum": 60},
        "note": {"type": "string", "maxLength": 6},  # a random model never closes an unbounded one
        "tags": {"type": "array", "items": {"type": "string", "enum": ["wind", "rain"]}, "maxItems": 2},
    },
    "required": ["city", "sunny", "celsius", "note", "tags"],
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def check_json(choice, schema: dict | None) -> bool:
    """A finished reply is JSON valid against `schema` (an object, for json_object); True if it finished."""
    if choice.finish_reason == "length":
        return False
    assert choice.finish_reason == "stop"
    value = json.loads(choice.message.content)  # strict: no raw control characters
    assert isinstance(value, dict)
    if schema is not None:
        jsonschema.validate(value, schema)
    return True


def test_json_schema_replies_parse_and_validate_greedy_sampled_and_n(kit_server):
    api = client(kit_server)
    finished = 0
    for temperature, seed in [(0, None), (1.0, 1), (1.0, 2)]:
        reply = api.chat.completions.create(model=KIT_MODEL, messages=ASK, max_tokens=120, n=2,
                                            temperature=temperature, seed=seed, response_format=SCHEMA_FORMAT)
        finished += sum(check_json(choice, WEATHER) for choice in reply.choices)
    assert finished >= 3  # most end; the test is not satisfied by cut replies alone


def test_response_format_text_is_the_plain_reply(kit_server):
    plain = dict(model=KIT_MODEL, messages=ASK, max_tokens=8, temperature=0)
    assert (client(kit_server).chat.completions.create(**plain, response_format={"type": "text"}).choices[0]
            .message.content == client(kit_server).chat.completions.create(**plain).choices[0].message.content)


def test_a_json_schema_reply_cut_by_max_tokens_says_length(kit_server):
    reply = client(kit_server).chat.completions.create(model=KIT_MODEL, messages=ASK, max_tokens=4,
                                                       temperature=0, response_format=SCHEMA_FORMAT)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and '{"city": "'.startswith(choice.message.content)  # the schema's order


def test_json_object_streams_a_json_object_and_logprobs_stay_finite(kit_server):
    chunks = list(client(kit_server).chat.completions.create(
        model=KIT_MODEL, messages=ASK, max_tokens=120, temperature=1.0, seed=3, stream=True,
        logprobs=True, top_logprobs=20, response_format={"type": "json_object"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [finish] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == "stop" and isinstance(json.loads(text), dict)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert entries and all(math.isfinite(e.logprob) for e in entries)
    # a grammar's ruled-out tokens are not offered as alternatives (-inf is not JSON)
    assert all(math.isfinite(t.logprob) for e in entries for t in e.top_logprobs)


def test_an_unconstrained_request_batched_with_constrained_ones_gets_its_lone_answer(kit_server):
    api = client(kit_server)
    plain = dict(model=KIT_MODEL, messages=[{"role": "user", "content": "Tell me a story"}], temperature=0,
                 max_tokens=24)
    alone = api.chat.completions.create(**plain).choices[0].message.content
    results: dict[str, object] = {}
    start = threading.Barrier(4)

    def ask(key: str, **extra) -> None:
        start.wait()
        results[key] = api.chat.completions.create(**{**plain, **extra}).choices[0]

    threads = [threading.Thread(target=ask, args=("plain",))] + [
        threading.Thread(target=ask, args=(f"json{i}",), kwargs=dict(
            messages=ASK, max_tokens=120, response_format=SCHEMA_FORMAT)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results["plain"].message.content == alone
    assert sum(check_json(results[f"json{i}"], WEATHER) for i in range(3)) >= 1


def test_a_schema_xgrammar_cannot_compile_is_a_400_in_plain_words(kit_server):
    bad = {"type": "json_schema", "json_schema": {"name": "w", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client(kit_server).chat.completions.create(model=KIT_MODEL, messages=ASK, max_tokens=4, response_format=bad)
    body = caught.value.body
    assert body["param"] == "response_format" and "cannot be turned into a grammar" in body["message"]
    assert ".cc:" not in body["message"] and "\n" not in body["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # json_schema without its schema object
        client(kit_server).chat.completions.create(model=KIT_MODEL, messages=ASK, max_tokens=4,
                                                   response_format={"type": "json_schema"})
    assert "json_schema" in caught.value.body["message"]


def test_response_format_with_tools_is_refused_not_half_honoured(kit_server):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client(kit_server).chat.completions.create(model=KIT_MODEL, messages=ASK, max_tokens=4, tools=[tool],
                                                   response_format={"type": "json_object"})
    assert "together with tools" in caught.value.body["message"]
    reply = client(kit_server).chat.completions.create(  # tool_choice "none": the tools are not offered
        model=KIT_MODEL, messages=ASK, max_tokens=120, tools=[tool], tool_choice="none", temperature=0,
        response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "length" or isinstance(json.loads(reply.choices[0].message.content), dict)


def test_on_the_real_layout_no_control_token_is_ever_allowed_and_a_complete_object_allows_only_the_end(
        real_layout_tokenizer):  # noqa: F811
    import torch

    from setup_kit.serve.grammar import Grammars

    tok = real_layout_tokenizer
    names = ["<unk>", "<s>", "</s>", "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>",
             "<|im_end|>", "<|im_start|>"]
    control = dict(zip(names, (tok.convert_tokens_to_ids(n) for n in names)))
    stops = {control["</s>"], control["<|im_end|>"]}
    matcher = Grammars(tok, 92544, stops).compile("json_schema", {
        "type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}).matcher()

    def allowed() -> set[int]:
        logits = torch.zeros(2, 92544)
        matcher.mask(logits, 1)
        assert torch.equal(logits[0], torch.zeros(92544))  # the other row is untouched
        return set(torch.isfinite(logits[1]).nonzero().flatten().tolist())

    def feed(text: str) -> None:  # as byte tokens (ids 3-258 on the real layout)
        for byte in text.encode():
            assert matcher.accept(tok.convert_tokens_to_ids(f"<0x{byte:02X}>"))

    feed('{"note": "')  # into the string's body, where almost any text may go
    inside = allowed()
    assert len(inside) > 1000 and not inside & set(control.values())
    assert tok.convert_tokens_to_ids("<0x0A>") not in inside  # a raw newline is not JSON text
    assert matcher.accept(tok.convert_tokens_to_ids("<0xED>"))  # 0xED starts U+D000-U+D7FF (Hangul)...
    after = allowed()
    assert tok.convert_tokens_to_ids("<0x9F>") in after  # ... never U+D800-U+DFFF, surrogates, not UTF-8
    assert not after & {tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(0xA0, 0xC0)}
    for byte in (0x9F, 0xBF):  # U+D7FF, then close the string and the object
        assert matcher.accept(tok.convert_tokens_to_ids(f"<0x{byte:02X}>"))
    feed('"}')
    assert allowed() == stops


def test_without_xgrammar_response_format_is_a_400_naming_the_install(tiny_model_and_tokenizer, monkeypatch):
    from setup_kit.serve.grammar import GrammarError, Grammars

    _, tokenizer, _ = tiny_model_and_tokenizer
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    with pytest.raises(GrammarError, match=r"no xgrammar\. Install it \(pip install xgrammar"):
        Grammars(tokenizer, len(tokenizer), {2}).compile("json_object")
