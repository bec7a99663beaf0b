"""Tool calls on the api_server: the parsers on recorded outputs of each format (malformed ones are text),
and ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` / ``response_format`` through the official
``openai`` client against a real server on a tiny random model."""
import json
import re

import pytest
import requests

from lmwrap_engine import GenerationConfig
from lmwrap_engine.serve.openai.errors import APIError
from lmwrap_engine.serve.openai.tool_parsers import HermesToolParser, InternLM2ToolParser, Llama3ToolParser, \
    ToolCall, ToolCallStream, get_tool_parser
from lmwrap_engine.serve.openai.tools import check_tools
from serving import running_server, wait_blocks_free

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")


def _grammar_supported() -> bool:
    try:
        GenerationConfig(response_format={"type": "json_object"})
    except NotImplementedError:
        return False
    return True


needs_grammar = pytest.mark.skipif(not _grammar_supported(), reason="GenerationConfig(response_format=...) raises "
                                   "NotImplementedError: the engine has no structured output yet")

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast of a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "add", "description": "Adds two integers",
                                           "parameters": {"type": "object",
                                                          "properties": {"a": {"type": "integer", "enum": [1, 2, 3]},
                                                                         "b": {"type": "integer", "enum": [4, 5]}},
                                                          "required": ["a", "b"], "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


# -- parsers on recorded outputs ------------------------------------------------------------------

@pytest.mark.parametrize("parser, text, content, calls", [
    (HermesToolParser(), 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
     '"days": 3}}\n</tool_call>', "Let me check.", [("get_weather", {"city": "Paris", "days": 3})]),
    (HermesToolParser(), '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", '
     '"arguments": "{\\"x\\": 1}"}\n</tool_call>', "", [("a", {}), ("b", {"x": 1})]),
    (HermesToolParser(), '<tool_call>\n{"name": "a", "arguments": {"x": 1}}', "", [("a", {"x": 1})]),  # cut at stop
    (InternLM2ToolParser(), 'I will search.<|action_start|><|plugin|>\n{"name": "search", "parameters": '
     '{"q": "lmdeploy"}}<|action_end|>', "I will search.", [("search", {"q": "lmdeploy"})]),
    (InternLM2ToolParser(), '<|action_start|><|plugin|>\n{"name": "search", "arguments": {"q": "x"}}', "",
     [("search", {"q": "x"})]),
    (Llama3ToolParser(), '{"name": "get_weather", "parameters": {"city": "Rome", "days": 1}}', "",
     [("get_weather", {"city": "Rome", "days": 1})]),
    (Llama3ToolParser(), '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": 2}}',
     "", [("a", {}), ("b", {"y": 2})]),
    (Llama3ToolParser(), '<function=spotify_trending_songs>{"n": 10}</function>', "",
     [("spotify_trending_songs", {"n": 10})]),
])
def test_parsers_read_recorded_calls(parser, text, content, calls):
    got_content, got = parser.parse(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls


@pytest.mark.parametrize("parser, text", [
    (HermesToolParser(), '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>'),  # missing brace
    (HermesToolParser(), '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
    (HermesToolParser(), '<tool_call>\n{"name": "a", "arguments": [1]}\n</tool_call>'),  # arguments not an object
    (HermesToolParser(), 'just text, no call'),
    (InternLM2ToolParser(), '<|action_start|><|plugin|>\nnot json<|action_end|>'),
    (InternLM2ToolParser(), '<|action_start|><|interpreter|>\nprint(1)<|action_end|>'),  # not a plugin call
    (Llama3ToolParser(), '{"name": "a", "parameters": {'),
    (Llama3ToolParser(), '{"city": "Paris"}'),  # JSON, but not a call
    (Llama3ToolParser(), 'The answer is {"name": "a"} in prose.'),
    (Llama3ToolParser(), '<function=a>{broken}</function>'),
])
def test_malformed_calls_are_plain_text(parser, text):
    assert parser.parse(text) == (text, [])


def test_enforced_payloads_parse_as_objects_or_lists():
    for parser in (HermesToolParser(), InternLM2ToolParser(), Llama3ToolParser()):
        key = parser.args_key
        one = json.dumps({"name": "add", key: {"a": 1, "b": 4}})
        assert parser.parse_payload(" " + one + "\n") == ("", [ToolCall("add", {"a": 1, "b": 4})])
        assert len(parser.parse_payload(f"[{one}, {one}]")[1]) == 2
        assert parser.parse_payload('{"name": "add", ')[1] == []  # cut by max_tokens: text


def test_call_schema_admits_exactly_the_tools_calls():
    functions = [t["function"] for t in TOOLS]
    for parser in (HermesToolParser(), InternLM2ToolParser(), Llama3ToolParser()):
        key = parser.args_key
        schema = parser.call_schema(functions, parallel=False)
        jsonschema.validate({"name": "add", key: {"a": 2, "b": 5}}, schema)
        jsonschema.validate({"name": "get_weather", key: {"city": "Oslo", "days": 2}}, schema)
        for bad in ({"name": "add", key: {"a": 9, "b": 5}}, {"name": "nope", key: {}},
                    {"name": "add", key: {"a": 1, "b": 4}, "extra": 1}, {"name": "add"}):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, schema)
        many = parser.call_schema(functions, parallel=True)
        jsonschema.validate([{"name": "add", key: {"a": 1, "b": 4}}], many)
        for wrong in ([], [{"name": "add", key: {"a": 1, "b": 4}}] * 5):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(wrong, many)


def test_stream_holds_calls_back_and_streams_text():
    stream = ToolCallStream(HermesToolParser())
    pieces = ["Hello ", "wor", "ld <tool", '_call>\n{"name": "add", ', '"arguments": {"a": 1, "b": 4}}\n</tool_call>']
    assert [stream.feed(p) for p in pieces] == ["Hello ", "wor", "ld ", "", ""]
    assert stream.finish() == ("", [ToolCall("add", {"a": 1, "b": 4})])
    # a partial marker that turns out to be text is sent at the end
    stream = ToolCallStream(HermesToolParser())
    assert stream.feed("a <tool") == "a " and stream.feed("s>") == "<tools>"
    assert stream.finish() == ("", [])
    # Llama 3: a reply opening with '{' is held, prose is not; malformed held text comes back as content
    stream = ToolCallStream(Llama3ToolParser())
    assert [stream.feed(p) for p in (" ", '{"name": ', '"a"')] == ["", "", ""]
    assert stream.finish() == (' {"name": "a"', [])
    stream = ToolCallStream(Llama3ToolParser())
    assert stream.feed("Sure {x}") == "Sure {x}"


def test_parser_registry_and_template_choice():
    from lmwrap_engine.chat_template import ChatTemplateConfig

    assert get_tool_parser("auto", ChatTemplateConfig("internlm2").chat_template).name == "internlm2"
    assert get_tool_parser("auto", ChatTemplateConfig("llama3_1").chat_template).name == "llama3"
    assert get_tool_parser(None, ChatTemplateConfig("qwen").chat_template).name == "hermes"
    assert get_tool_parser("llama3").name == "llama3"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        get_tool_parser("mistral")


@pytest.mark.parametrize("tools, problem", [
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"description": "no name"}}], "function.name"),
    ([{"type": "retrieval", "function": {"name": "a"}}], "tools[0]"),
    ([{"type": "function", "function": {"name": "has space"}}], "function.name"),
    ([{"type": "function", "function": {"name": "a", "parameters": "object"}}], "parameters"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": 5}}}], "not a valid JSON schema"),
    ([TOOLS[0], TOOLS[0]], "used by another tool"),
])
def test_check_tools_names_the_problem(tools, problem):
    with pytest.raises(APIError) as info:
        check_tools(tools)
    assert info.value.status == 400 and problem in info.value.message


# -- a real server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, "--dtype", "float32", "--num-gpu-blocks", "128",
                        "--cache-block-seq-len", "16") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture
def client(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
        yield c


def _check_call(call, names=tuple(SCHEMAS)):
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _collect_stream(chunks):
    """(content, {index: {id, name, arguments}}, finish_reason, the tool_call deltas in order)."""
    content, calls, reason, deltas = "", {}, None, []
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                deltas.append(tc)
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = slot["id"] or tc.id
                if tc.function is not None:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, calls, reason, deltas


def test_auto_and_none_put_tools_in_the_prompt_or_not(client, model_dir):
    plain = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=8, temperature=0)
    none = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=8, temperature=0,
                                          tools=TOOLS, tool_choice="none")
    auto = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=8, temperature=0,
                                          tools=TOOLS)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools are described to the model
    # a random model writes no call: 'auto' answers its text as content
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason in ("stop", "length")
    assert isinstance(auto.choices[0].message.content, str)


def test_auto_stream_matches_the_whole_reply(client, model_dir):
    kw = dict(model=model_dir, messages=MESSAGES, max_tokens=12, temperature=0, tools=TOOLS)
    whole = client.chat.completions.create(**kw)
    content, calls, reason, _ = _collect_stream(client.chat.completions.create(stream=True, **kw))
    assert content == whole.choices[0].message.content and not calls
    assert reason == whole.choices[0].finish_reason


@needs_grammar
def test_required_gives_a_valid_call(client, model_dir):
    for seed in range(3):
        r = client.chat.completions.create(model=model_dir, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           max_tokens=400, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls and choice.message.content is None
        for call in choice.message.tool_calls:
            _check_call(call)


@needs_grammar
def test_named_function_and_no_parallel_calls(client, model_dir):
    r = client.chat.completions.create(model=model_dir, messages=MESSAGES, tools=TOOLS, max_tokens=200,
                                       tool_choice={"type": "function", "function": {"name": "add"}},
                                       temperature=0.8, seed=1, parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "add"
    _check_call(calls[0], ("add",))
    r = client.chat.completions.create(model=model_dir, messages=MESSAGES, tools=TOOLS, max_tokens=200,
                                       tool_choice="required", temperature=0.8, seed=2, parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1
    _check_call(r.choices[0].message.tool_calls[0])


@needs_grammar
def test_streamed_call_deltas(client, model_dir):
    kw = dict(model=model_dir, messages=MESSAGES, tools=TOOLS, max_tokens=200, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    content, calls, reason, deltas = _collect_stream(client.chat.completions.create(stream=True, **kw))
    assert reason == "tool_calls" and content == ""
    assert len(calls) == len(whole) >= 1
    # OpenAI's order: id, type and name first (arguments empty), then the arguments
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
    assert deltas[1].id is None and deltas[1].function.arguments
    for i, call in calls.items():
        assert call["name"] == "get_weather" == whole[i].function.name
        assert json.loads(call["arguments"]) == json.loads(whole[i].function.arguments)  # greedy: the same
        jsonschema.validate(json.loads(call["arguments"]), WEATHER_PARAMS)


def test_round_trip_with_a_tool_message(client, model_dir):
    call = {"id": "call_abc123", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}
    history = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=model_dir, messages=history, tools=TOOLS, max_tokens=8,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None
    shorter = client.chat.completions.create(model=model_dir, messages=history[:-1] + [
        {**history[-1], "content": "sunny"}], tools=TOOLS, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > shorter.usage.prompt_tokens  # the tool result and the call are in the prompt
    without_call = client.chat.completions.create(model=model_dir, messages=history[:1] + [
        {"role": "assistant", "content": ""}] + history[2:], tools=TOOLS, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > without_call.usage.prompt_tokens


@pytest.mark.parametrize("extra, problem", [
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "function.name"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "objekt"}}}]},
     "not a valid JSON schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [], "tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "regex_schema"}}, "regex_schema"),
    ({"messages": MESSAGES + [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
                              {"role": "user", "content": "x"}], "tools": TOOLS}, "tool_calls[0]"),
    ({"messages": MESSAGES + [{"role": "assistant", "tool_calls": [
        {"function": {"name": "add", "arguments": "{not json"}}]}], "tools": TOOLS}, "not valid JSON"),
])
def test_bad_input_is_a_400_naming_the_problem(url, model_dir, extra, problem):
    body = {"model": model_dir, "messages": MESSAGES, "max_tokens": 4, **extra}
    for stream in (False, True):
        r = requests.post(url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=60)
        assert r.status_code == 400, r.text
        assert problem in r.json()["message"]


@needs_grammar
def test_uncompilable_schema_is_a_400_and_the_server_keeps_serving(url, client, model_dir):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                         "properties": {"a": {"$ref": "#/nope"}}}}}
    r = requests.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": model_dir, "messages": MESSAGES, "max_tokens": 4, "response_format": bad})
    assert r.status_code == 400 and "response_format" in r.text
    tools = [{"type": "function", "function": {"name": "f", "parameters": bad["json_schema"]["schema"]}}]
    r = requests.post(url + "/v1/chat/completions", timeout=60, json={
        "model": model_dir, "messages": MESSAGES, "max_tokens": 4, "tools": tools, "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["param"] == "tools", r.text
    assert "cannot be enforced" in r.json()["message"]
    r = requests.post(url + "/v1/completions", timeout=60, json={
        "model": model_dir, "prompt": "x", "max_tokens": 4, "response_format": {"type": "regex_schema",
                                                                                "regex_schema": "(unclosed"}})
    assert r.status_code == 400 and r.json()["param"] == "response_format", r.text
    ok = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert wait_blocks_free(url)["lmwrap_kv_cache_blocks_used"] == 0


@needs_grammar
def test_response_format_on_chat_and_completions(client, model_dir, url):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "days"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}}
    r = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=100, temperature=1.0, seed=3,
                                       response_format=rf)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    chunks = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=100, temperature=1.0,
                                            seed=4, response_format=rf, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), schema)
    r = client.completions.create(model=model_dir, prompt="A phone number:", max_tokens=20, temperature=1.0,
                                  extra_body={"response_format": {"type": "regex_schema",
                                                                  "regex_schema": r"\d{3}-\d{4}"}})
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    r = client.completions.create(model=model_dir, prompt="JSON:", max_tokens=60, temperature=1.0, seed=5,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "t", "schema": schema}}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_server_is_healthy_and_frees_every_block(url):
    assert requests.get(url + "/health", timeout=10).status_code == 200
    m = wait_blocks_free(url)
    assert m["lmwrap_kv_cache_blocks_used"] == 0 and m["lmwrap_num_requests_running"] == 0


@needs_grammar
def test_lmdeploy_client_passes_tools_through(url):
    from lmwrap import LMDeployClient

    with LMDeployClient(url, max_new_tokens=200, top_k=1, temperature=0) as llm:
        reply = llm.chat_completion(MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
        assert reply["finish_reason"] == "tool_calls" and len(reply["tool_calls"]) == 1
        call = reply["tool_calls"][0]
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
        history = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call]},
                              {"role": "tool", "tool_call_id": call["id"], "content": "42"}]
        answer = llm.chat_completion(history, tools=TOOLS, tool_choice="none", max_new_tokens=4)
        assert answer["tool_calls"] is None and isinstance(answer["content"], str)
        from lmwrap.base import LLMError
        with pytest.raises(LLMError, match="not in tools"):
            llm.chat_completion(MESSAGES, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})


@needs_grammar
def test_tool_call_parser_flag(model_dir):
    from lmwrap_engine.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "api_server", model_dir, "--tool-call-parser", "bogus"])
    # the built-in InternLM2 template (tool role = environment) with Llama 3's JSON call format
    with running_server(model_dir, "--dtype", "float32", "--num-gpu-blocks", "64", "--chat-template", "internlm2",
                        "--tool-call-parser", "llama3") as (url, _):
        body = {"model": model_dir, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 200, "temperature": 0}
        r = requests.post(url + "/v1/chat/completions", json={**body, "tool_choice": "auto"}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] is None
        named = {"type": "function", "function": {"name": "add"}}
        r = requests.post(url + "/v1/chat/completions", json={**body, "tool_choice": named}, timeout=120)
        call = r.json()["choices"][0]["message"]["tool_calls"][0]
        assert call["function"]["name"] == "add"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["add"])
        history = MESSAGES + [{"role": "assistant", "content": "", "tool_calls": [call]},
                              {"role": "tool", "tool_call_id": call["id"], "content": "5"}]
        r = requests.post(url + "/v1/chat/completions", json={**body, "messages": history, "max_tokens": 2},
                          timeout=120)
        assert r.status_code == 200, r.text


@pytest.mark.slow
@needs_grammar
def test_the_tools_agent_example_on_the_default_model():
    import os
    import subprocess
    import sys

    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                           "openai_tools_agent.py")
    proc = subprocess.run([sys.executable, example], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    call = next(line for line in proc.stdout.splitlines() if line.startswith("tool call: calculator("))
    assert "[call_" in call and "error" not in call
    assert any(line.startswith("answer: ") for line in proc.stdout.splitlines())


TOOL_TEMPLATE = (  # a Qwen2.5-like template: tools in the system turn, calls and results rendered
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


def test_prompt_tools_for_templates_with_and_without_tool_support(model_dir):
    from transformers import AutoTokenizer

    from lmwrap_engine.chat_template import ChatTemplateConfig, HFChatTemplate
    from lmwrap_engine.serve.openai.tools import prompt_tools

    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 4}'}}
    history = MESSAGES + [{"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    functions = [t["function"] for t in TOOLS]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TOOL_TEMPLATE
    template = HFChatTemplate(tokenizer)
    parser = get_tool_parser("auto", template)
    tools, messages = prompt_tools(TOOLS, functions, history, template, parser)
    assert tools == TOOLS and messages[0] == MESSAGES[0]  # the template renders them itself
    text = template.messages2prompt(messages, tools=tools)
    assert "Tools: get_weather add" in text and '<tool_call>add {"a": 1, "b": 4}</tool_call>' in text
    assert "<|im_start|>tool\n5<|im_end|>" in text
    # the tiny models' plain ChatML template ignores tools: they (and the call) are written in Hermes' format
    plain = HFChatTemplate(AutoTokenizer.from_pretrained(model_dir))
    tools, messages = prompt_tools(TOOLS, functions, history, plain, get_tool_parser("auto", plain))
    assert tools is None and messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    text = plain.messages2prompt(messages)
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 4}}\n</tool_call>' in text
    # a built-in without a tool role gets the result as a user turn; InternLM2's renders its own
    qwen = ChatTemplateConfig("qwen").chat_template
    _, messages = prompt_tools(TOOLS, functions, history, qwen, get_tool_parser("auto", qwen))
    assert "Result of a tool call:\n5" in qwen.messages2prompt(messages)
    internlm2 = ChatTemplateConfig("internlm2").chat_template
    tools, messages = prompt_tools(TOOLS, functions, history, internlm2, get_tool_parser("auto", internlm2))
    text = internlm2.messages2prompt(messages, tools=tools)
    assert tools == functions and "<|im_start|>environment\n5<|im_end|>" in text and "<|action_start|>" in text
