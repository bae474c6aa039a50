"""What standard OpenAI clients need from `internlm-kit serve`, through the official `openai` package.

n > 1, logprobs, penalties and logit_bias, /v1/completions with echo + logprobs (what
lm-evaluation-harness's local-completions model sends), GET /v1/models/{id}, and tool calling in
InternLM2's own markup, parsed into OpenAI tool_calls, streamed too; LangChain's ChatOpenAI on top
(response_format itself: tests/test_serve_response_format.py).
"""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
from fixtures.servers import KIT_MODEL, WEATHER_TOOL

from setup_kit.serve.prompt import encode_text

USER = [{"role": "user", "content": "Tell me a story"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def test_get_one_model_by_id(kit_server):
    card = client(kit_server).models.retrieve(KIT_MODEL)
    assert card.id == KIT_MODEL
    with pytest.raises(openai.NotFoundError):
        client(kit_server).models.retrieve("gpt-4")


def test_n_choices_each_their_own_and_repeatable_with_a_seed(kit_server):
    params = dict(model=KIT_MODEL, messages=USER, n=3, temperature=1.0, max_tokens=12, seed=7)
    reply = client(kit_server).chat.completions.create(**params)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1
    assert [c.message.content for c in client(kit_server).chat.completions.create(**params).choices] == texts
    assert reply.usage.completion_tokens == sum(
        len(kit_server.served.tokenizer.encode(t, add_special_tokens=False)) for t in texts) or \
        reply.usage.completion_tokens <= 36
    chunks = list(client(kit_server).chat.completions.create(**params, stream=True))
    streamed = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_logprobs_are_the_chosen_tokens_with_their_alternatives(kit_server):
    reply = client(kit_server).chat.completions.create(model=KIT_MODEL, messages=USER, temperature=0,
                                                       max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the likeliest one
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, rel_tol=1e-5)
        assert entry.token == entry.top_logprobs[0].token
    plain = client(kit_server).chat.completions.create(model=KIT_MODEL, messages=USER, temperature=0, max_tokens=6)
    assert plain.choices[0].logprobs is None


def test_logit_bias_and_penalties_change_what_is_chosen(kit_server):
    tok = kit_server.served.tokenizer
    forced = tok.convert_tokens_to_ids("▁the")
    reply = client(kit_server).chat.completions.create(
        model=KIT_MODEL, messages=USER, temperature=0, max_tokens=5, logit_bias={str(forced): 100})
    assert reply.choices[0].message.content == tok.decode([forced] * 5)
    # A bias that wins every step would repeat its token throughout; the penalties push back on it.
    brief = [{"role": "system", "content": "Be brief."}] + USER

    def times_forced(bias: float, **penalty) -> int:
        reply = client(kit_server).chat.completions.create(
            model=KIT_MODEL, messages=brief, temperature=0, max_tokens=12, logit_bias={str(forced): bias},
            logprobs=True, **penalty)
        return [e.token for e in reply.choices[0].logprobs.content].count(tok.decode([forced]))

    bias = next(b for b in range(1, 30) if times_forced(float(b)) == 12)  # the smallest that always wins
    assert times_forced(bias + 4.0) == 12
    # bias + 4 - 2 x count falls below what was needed to win: the token stops being chosen
    assert 2 <= times_forced(bias + 4.0, frequency_penalty=2.0) < 12


def test_the_penalties_are_openais_formula():
    """logit -= frequency_penalty x count + presence_penalty x (count > 0), on generated tokens only."""
    import torch

    from setup_kit.serve.scheduler import Request, SamplingParams, _adjust

    class Slot:
        request = Request(prompt_ids=[1], emit=print, params=SamplingParams(
            max_tokens=1, frequency_penalty=0.5, presence_penalty=1.0, logit_bias={2: 3.0}))
        counts = {5: 3, 7: 1}

    logits = torch.zeros(2, 10)
    _adjust(logits, 1, Slot())
    expected = torch.zeros(10)
    expected[5], expected[7], expected[2] = -(3 * 0.5 + 1.0), -(0.5 + 1.0), 3.0
    assert torch.equal(logits[1], expected) and torch.equal(logits[0], torch.zeros(10))


def test_completions_echo_with_logprobs_scores_the_prompt_as_lm_eval_needs(kit_server):
    tok = kit_server.served.tokenizer
    prompt = "The capital of France is Paris"
    reply = client(kit_server).completions.create(model=KIT_MODEL, prompt=prompt, max_tokens=0, echo=True,
                                                  logprobs=1, temperature=0)
    choice = reply.choices[0]
    ids = [tok.bos_token_id] + encode_text(tok, prompt, at_start=True)
    assert choice.text.endswith(prompt) and len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    # each score is the model's own: log-softmax of the logits at the position before
    import torch

    with torch.no_grad():
        logits = kit_server.served.scheduler.model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = [float(torch.log_softmax(logits[i - 1], -1)[ids[i]]) for i in range(1, len(ids))]
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(choice.logprobs.token_logprobs[1:], expected))
    # the continuation's offsets point into the echoed text
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)
    generated = client(kit_server).completions.create(model=KIT_MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert generated.choices[0].finish_reason in ("stop", "length") and generated.usage.completion_tokens <= 4


# ---- tool calling ---------------------------------------------------------------------------------

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]


def test_a_tool_call_round_trip_through_the_openai_client(tool_server):
    api = client(tool_server)
    reply = api.chat.completions.create(model=KIT_MODEL, messages=ASK, tools=[WEATHER_TOOL], temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id
    messages = ASK + [choice.message,  # the client's own message object, as the README shows
                      {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    final = api.chat.completions.create(model=KIT_MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == "It is sunny in Paris." and not final.choices[0].message.tool_calls


def test_tool_calls_stream_as_openai_deltas(tool_server):
    chunks = list(client(tool_server).chat.completions.create(
        model=KIT_MODEL, messages=ASK, tools=[WEATHER_TOOL], temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == "Let me check." and "action" not in text
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert finishes == ["tool_calls"]


def test_without_tools_the_markup_is_not_turned_into_calls(tool_server):
    reply = client(tool_server).chat.completions.create(model=KIT_MODEL, messages=ASK, temperature=0)
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls


def test_tool_choice_naming_an_unknown_function_is_400(kit_server):
    r = httpx.post(kit_server.url + "/chat/completions", json={
        "messages": ASK, "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]


def test_the_tool_call_parser_holds_back_markup_and_reads_both_argument_spellings():
    from setup_kit.serve.tool_calls import ToolCallParser

    parser = ToolCallParser()
    shown = [parser.feed(piece)[0] for piece in ["Sure <|act", "ion_start|><|plugin|>\n{\"name\": \"f\", ",
                                                 "\"arguments\": {\"x\": 1}}<|action_end|> done"]]
    assert "".join(shown) == "Sure  done" and shown[0] == "Sure "
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("f", {"x": 1})]
    forced = ToolCallParser('<|action_start|><|plugin|>\n{"name": "f", "parameters": ')
    assert forced.feed('{"x": 2}}')[0] == "" and forced.finish()[1][0].arguments == '{"x": 2}'
    broken = ToolCallParser()
    assert broken.feed("<|action_start|>not json<|action_end|>")[0] == "<|action_start|>not json<|action_end|>"


def test_tool_choice_naming_a_function_starts_the_reply_inside_that_call(tool_server):
    reply = client(tool_server).chat.completions.create(
        model=KIT_MODEL, messages=ASK, tools=[WEATHER_TOOL], temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.choices[0].finish_reason == "tool_calls"


def test_tool_choice_required_starts_the_reply_inside_a_call(tool_server):
    reply = client(tool_server).chat.completions.create(
        model=KIT_MODEL, messages=ASK, tools=[WEATHER_TOOL], temperature=0, tool_choice="required")
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.choices[0].finish_reason == "tool_calls" and not reply.choices[0].message.content


LANGCHAIN_SCRIPT = """
import json, sys
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

llm = ChatOpenAI(base_url=sys.argv[1], api_key="unused", model=sys.argv[2], temperature=0, max_retries=0,
                 timeout=60)
ask = [SystemMessage("Be brief."), HumanMessage("Weather in Paris?")]
out = {"invoke": llm.invoke(ask).content, "stream": "".join(c.content for c in llm.stream(ask))}

@tool
def get_weather(city: str) -> str:
    \"\"\"The current weather in a city.\"\"\"
    return "sunny, 21 C"

bound = llm.bind_tools([get_weather])
ai = bound.invoke(ask)
out["tool_calls"] = ai.tool_calls
result = ToolMessage(get_weather.invoke(ai.tool_calls[0]["args"]), tool_call_id=ai.tool_calls[0]["id"])
out["final"] = bound.invoke(ask + [ai, result]).content

class Weather(BaseModel):
    city: str

out["structured"] = llm.with_structured_output(Weather, method="function_calling").invoke(ask).model_dump()
# the default method, json_schema: response_format, honoured by constrained decoding
as_json = [SystemMessage("Be brief."), HumanMessage("Weather in Paris, as JSON?")]
out["structured_json"] = llm.with_structured_output(Weather).invoke(as_json).model_dump()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_langchain_chat_openai_invoke_stream_tools_and_structured_output(tool_server, tmp_path):
    """LangChain's ChatOpenAI (its own venv: langchain-openai from PyPI) against the server."""
    import subprocess

    from fixtures.venvs import cached_venv

    python = cached_venv("langchain-openai", ["langchain-openai==1.7.4"])
    script = tmp_path / "lc.py"
    script.write_text(LANGCHAIN_SCRIPT)
    done = subprocess.run([str(python), str(script), tool_server.url, KIT_MODEL], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["invoke"] and out["stream"] == out["invoke"]
    [call] = out["tool_calls"]
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    assert out["final"] == "It is sunny in Paris."
    assert out["structured"] == {"city": "Paris"}
    assert out["structured_json"] == {"city": "Paris"}
