"""Chat templates: lmdeploy v0.6.2's built-in strings byte for byte, config overrides and JSON, errors,
the model's own Jinja template, and session continuation (turn-by-turn prompts add up to the full render)."""
import json

import pytest

from lmwrap_engine.chat_template import (BaseChatTemplate, ChatTemplateConfig, HFChatTemplate, best_match_model,
                                         get_chat_template, list_chat_template_names)

SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "Hi"}
A1 = {"role": "assistant", "content": "Hello!"}
U2 = {"role": "user", "content": "Bye"}

# lmdeploy v0.6.2's default system prompts, typed out here to check the module's copies.
INTERNLM_META = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文.\n")
LLAMA2_META = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information.")
VICUNA_META = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the user's questions.")
L3_SYS, L3_USER, L3_ASSISTANT = ("<|start_header_id|>system<|end_header_id|>\n\n",
                                 "<|start_header_id|>user<|end_header_id|>\n\n",
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n")

# name -> (prompt for [U1], for [SYS, U1, A1, U2], for [U1, A1], get_prompt('Bye', sequence_start=False))
EXPECTED = {
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!",
        "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    "internlm2": (
        f"<|im_start|>system\n{INTERNLM_META}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
        f"<|im_start|>system\n{INTERNLM_META}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!",
        "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    "internlm": (
        f"<|System|>:{INTERNLM_META}\n<|User|>:Hi\n<|Bot|>:",
        "<|System|>:Be brief.\n<|User|>:Hi\n<|Bot|>:Hello!<eoa>\n<|User|>:Bye\n<|Bot|>:",
        f"<|System|>:{INTERNLM_META}\n<|User|>:Hi\n<|Bot|>:Hello!",
        "\n<|User|>:Bye\n<|Bot|>:"),
    "llama2": (
        f"[INST] <<SYS>>\n{LLAMA2_META}\n<</SYS>>\n\nHi [/INST] ",
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello!</s><s>[INST] Bye [/INST] ",
        f"[INST] <<SYS>>\n{LLAMA2_META}\n<</SYS>>\n\nHi [/INST] Hello!",
        "<s>[INST] Bye [/INST] "),
    "llama3": (
        f"<|begin_of_text|>{L3_USER}Hi<|eot_id|>{L3_ASSISTANT}",
        f"<|begin_of_text|>{L3_SYS}Be brief.<|eot_id|>{L3_USER}Hi<|eot_id|>{L3_ASSISTANT}Hello!<|eot_id|>"
        f"{L3_USER}Bye<|eot_id|>{L3_ASSISTANT}",
        f"<|begin_of_text|>{L3_USER}Hi<|eot_id|>{L3_ASSISTANT}Hello!",
        f"{L3_USER}Bye<|eot_id|>{L3_ASSISTANT}"),
    "llama3_1": (
        f"<|begin_of_text|>{L3_SYS}Cutting Knowledge Date: December 2023\nToday Date: 23 Jul 2024\n\n"
        f"You are a helpful assistant.<|eot_id|>{L3_USER}Hi<|eot_id|>{L3_ASSISTANT}",
        f"<|begin_of_text|>{L3_SYS}Be brief.<|eot_id|>{L3_USER}Hi<|eot_id|>{L3_ASSISTANT}Hello!<|eot_id|>"
        f"{L3_USER}Bye<|eot_id|>{L3_ASSISTANT}",
        f"<|begin_of_text|>{L3_SYS}Cutting Knowledge Date: December 2023\nToday Date: 23 Jul 2024\n\n"
        f"You are a helpful assistant.<|eot_id|>{L3_USER}Hi<|eot_id|>{L3_ASSISTANT}Hello!",
        f"{L3_USER}Bye<|eot_id|>{L3_ASSISTANT}"),
    "vicuna": (
        f"{VICUNA_META} USER: Hi ASSISTANT: ",
        "Be brief. USER: Hi ASSISTANT: Hello!</s>USER: Bye ASSISTANT: ",
        f"{VICUNA_META} USER: Hi ASSISTANT: Hello!",
        "USER: Bye ASSISTANT: "),
    "mistral": (
        "[INST] Hi [/INST]",
        "Be brief.[INST] Hi [/INST]Hello!</s>[INST] Bye [/INST]",
        "[INST] Hi [/INST]Hello!",
        "[INST] Bye [/INST]"),
    "base": ("Hi", "Be brief.HiHello!Bye", "HiHello!", "Bye"),
    "gemma": (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        "Be brief.<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!",
        # lmdeploy drops the '\n' after '<end_of_turn>' here; its own full render (above) has it.
        "\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
    "phi-3": (
        "<|user|>\nHi<|end|>\n<|assistant|>\n",
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nBye<|end|>\n"
        "<|assistant|>\n",
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello!",
        "\n<|user|>\nBye<|end|>\n<|assistant|>\n"),
    "deepseek": (  # lmdeploy opens this family's assistant turn without the marker's final space
        "User: Hi\n\nAssistant:",
        "Be brief.User: Hi\n\nAssistant: Hello!<｜end▁of▁sentence｜>User: Bye\n\nAssistant:",
        "User: Hi\n\nAssistant: Hello!",
        "User: Bye\n\nAssistant:"),
}
STOP_WORDS = {"qwen": ["<|im_end|>"], "internlm2": ["<|im_end|>", "<|action_end|>"], "internlm": ["<eoa>"],
              "llama2": [], "llama3": ["<|eot_id|>", "<|end_of_text|>"],
              "llama3_1": ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"], "vicuna": ["</s>"], "mistral": [],
              "base": [], "gemma": ["<end_of_turn>"], "phi-3": ["<|end|>", "<|endoftext|>", "<|assistant|>"],
              "deepseek": []}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_prompts_byte_for_byte(name):
    first, chat, reply_prefix, later = EXPECTED[name]
    template = ChatTemplateConfig(name).chat_template
    assert template.messages2prompt([U1]) == first
    assert template.messages2prompt([SYS, U1, A1, U2]) == chat
    assert template.messages2prompt([U1, A1]) == reply_prefix
    assert template.get_prompt("Bye", sequence_start=False) == later
    assert template.messages2prompt("Bye", sequence_start=False) == later
    assert template.stop_words == STOP_WORDS[name]
    if name != "llama3_1":  # lmdeploy's llama3_1 leaves the knowledge date out of string prompts
        assert template.get_prompt("Hi") == template.messages2prompt("Hi") == first


def test_llama3_1_string_prompt_has_no_knowledge_date():
    template = ChatTemplateConfig("llama3_1").chat_template
    assert template.get_prompt("Hi") == (f"<|begin_of_text|>{L3_SYS}You are a helpful assistant.<|eot_id|>"
                                         f"{L3_USER}Hi<|eot_id|>{L3_ASSISTANT}")


def test_names_and_aliases():
    names = list_chat_template_names()
    assert names == sorted(names)
    for name in ("base", "internlm", "internlm2", "qwen", "chatml", "llama2", "llama3", "llama3_1", "llama3_2",
                 "vicuna", "mistral", "mixtral", "gemma", "yi", "phi-3", "deepseek", "codellama", "glm4"):
        assert name in names
    chatml, qwen = ChatTemplateConfig("chatml").chat_template, ChatTemplateConfig("qwen").chat_template
    assert chatml.messages2prompt([SYS, U1, A1, U2]) == qwen.messages2prompt([SYS, U1, A1, U2])
    wizard = ChatTemplateConfig("wizardlm").chat_template
    assert wizard.messages2prompt([U1]) == EXPECTED["vicuna"][0]


def test_yi_has_no_default_system_and_glm4_prefix():
    yi = ChatTemplateConfig("yi").chat_template
    assert yi.messages2prompt([U1]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert yi.stop_words == ["<|im_end|>", "<|endoftext|>"]
    glm4 = ChatTemplateConfig("glm4").chat_template
    assert glm4.messages2prompt([U1, A1, U2]) == ("[gMASK]<sop><|user|>\nHi<|assistant|>\nHello!<|user|>\nBye"
                                                  "<|assistant|>\n")
    assert glm4.get_prompt("Bye", sequence_start=False) == "<|user|>\nBye<|assistant|>\n"


def test_codellama_capabilities():
    infill = ChatTemplateConfig("codellama", capability="infilling").chat_template
    assert infill.get_prompt("def f(<FILL>):") == "<PRE> def f( <SUF>): <MID>"
    assert infill.stop_words == ["<EOT>"]
    with pytest.raises(ValueError, match="<FILL>"):
        infill.get_prompt("no hole")
    assert ChatTemplateConfig("codellama", capability="completion").chat_template.get_prompt("x = 1") == "x = 1"
    chat = ChatTemplateConfig("codellama").chat_template
    assert chat.get_prompt("Hi") == "[INST] <<SYS>>\n\n<</SYS>>\n\nHi [/INST] "


def test_completion_capability_passes_strings_through():
    template = ChatTemplateConfig("qwen", capability="completion").chat_template
    assert template.get_prompt("Once upon") == "Once upon"
    assert template.messages2prompt("Once upon", sequence_start=False) == "Once upon"


def test_internlm2_roles_names_tools_and_tool_calls():
    template = ChatTemplateConfig("internlm2").chat_template
    call = {"role": "assistant", "content": "Searching.",
            "tool_calls": [{"function": {"name": "search", "parameters": {"q": "x"}}}]}
    env = {"role": "environment", "content": "result", "name": "plugin"}
    tool = {"role": "tool", "content": "r2"}
    prompt = template.messages2prompt([SYS, U1, call, env, tool], tools=[{"name": "search"}])
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        '<|im_start|>system name=<|plugin|>\n[{"name": "search"}]<|im_end|>\n'
        "<|im_start|>user\nHi<|im_end|>\n"
        '<|im_start|>assistant\nSearching.<|action_start|><|plugin|>\n{"name": "search", "arguments": {"q": "x"}}'
        "<|action_end|><|im_end|>\n"
        "<|im_start|>environment name=<|plugin|>\nresult<|im_end|>\n"
        "<|im_start|>environment\nr2<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert call["tool_calls"][0]["function"] == {"name": "search", "parameters": {"q": "x"}}  # input untouched


def test_llama3_1_tools_and_ipython():
    template = ChatTemplateConfig("llama3_1", meta_instruction="M").chat_template
    tools = [{"name": "f", "description": "does f"}]
    prompt = template.messages2prompt([U1, {"role": "ipython", "content": "out"}], tools=tools)
    assert prompt.startswith(f"<|begin_of_text|>{L3_SYS}Cutting Knowledge Date: December 2023\n"
                             "Today Date: 23 Jul 2024\n\n# Tool Instructions\n")
    assert "Use the function 'f' to: does f\n" + json.dumps(tools[0]) + "\n\n\nIf a you choose" in prompt
    assert prompt.endswith("- Always add your sources when using search results to answer the user query\n\n"
                           f"M<|eot_id|>{L3_USER}Hi<|eot_id|>"
                           f"<|start_header_id|>ipython<|end_header_id|>\n\nout<|eot_id|>{L3_ASSISTANT}")
    call = {"role": "assistant", "content": "<|python_tag|>f()"}
    assert template.messages2prompt([U1, call, U2]).endswith(
        f"{L3_ASSISTANT}<|python_tag|>f()<|eom_id|>{L3_USER}Bye<|eot_id|>{L3_ASSISTANT}")


def test_content_parts_and_inputs_not_mutated():
    template = ChatTemplateConfig("qwen").chat_template
    parts = {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}
    messages = [parts]
    assert template.messages2prompt(messages) == EXPECTED["qwen"][0]
    assert messages == [parts] and isinstance(parts["content"], list)
    with pytest.raises(ValueError, match="not text"):
        template.messages2prompt([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


def test_config_overrides():
    template = ChatTemplateConfig("qwen", meta_instruction="You are Bob.", stop_words=["<|im_end|>", "STOP"],
                                  separator="\n\n").chat_template
    assert template.messages2prompt([U1]) == ("<|im_start|>system\nYou are Bob.<|im_end|>\n<|im_start|>user\nHi"
                                              "<|im_end|>\n<|im_start|>assistant\n")
    assert template.stop_words == ["<|im_end|>", "STOP"]
    assert template.get_prompt("Bye", sequence_start=False).startswith("\n\n<|im_start|>user\n")
    llama3 = ChatTemplateConfig("llama3", meta_instruction="Sys.", user="<U>").chat_template
    assert llama3.messages2prompt([U1]) == (f"<|begin_of_text|>{L3_SYS}Sys.<|eot_id|><U>Hi<|eot_id|>{L3_ASSISTANT}")
    assert ChatTemplateConfig("qwen", stop_words="X").stop_words == ["X"]


def test_custom_template_needs_all_role_fields():
    fields = dict(system="<s>", eosys="</s>", user="<u>", eoh="</u>", assistant="<a>", eoa="</a>")
    config = ChatTemplateConfig("mine", meta_instruction="M", separator="|", stop_words=["</a>"], **fields)
    template = config.chat_template
    assert type(template) is BaseChatTemplate
    assert template.messages2prompt([U1, A1, U2]) == "<s>M</s><u>Hi</u><a>Hello!</a>|<u>Bye</u><a>"
    with pytest.raises(ValueError) as info:
        ChatTemplateConfig("qwne")
    message = str(info.value)
    assert "'qwne'" in message and "qwen" in message and "internlm2" in message and "eoa" in message
    with pytest.raises(ValueError, match=r"missing: \['eoa'\]"):
        ChatTemplateConfig("mine", **{**fields, "eoa": None})


def test_config_field_validation():
    with pytest.raises(ValueError, match="capability"):
        ChatTemplateConfig("qwen", capability="poetry")
    with pytest.raises(ValueError, match="stop_words"):
        ChatTemplateConfig("qwen", stop_words=["ok", ""])
    with pytest.raises(ValueError, match="system"):
        ChatTemplateConfig("qwen", system=3)
    with pytest.raises(ValueError, match="'hf'"):
        ChatTemplateConfig("hf").chat_template


def test_unknown_role_and_bad_messages():
    qwen = ChatTemplateConfig("qwen").chat_template
    with pytest.raises(ValueError, match="'environment'"):
        qwen.messages2prompt([U1, {"role": "environment", "content": "x"}])
    with pytest.raises(ValueError, match="'robot'"):
        ChatTemplateConfig("internlm2").chat_template.messages2prompt([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="role"):
        qwen.messages2prompt([{"content": "no role"}])
    with pytest.raises(ValueError):
        qwen.messages2prompt(42)
    with pytest.raises(ValueError):
        qwen.messages2prompt([{"role": "user", "content": 7}])


def test_json_round_trip(tmp_path):
    config = ChatTemplateConfig("internlm2", meta_instruction="你好 there", stop_words=["<|im_end|>"])
    text = config.to_json()
    assert json.loads(text)["meta_instruction"] == "你好 there"
    assert ChatTemplateConfig.from_json(text) == config
    path = tmp_path / "template.json"
    assert config.to_json(str(path)) == path.read_text(encoding="utf-8")
    assert ChatTemplateConfig.from_json(str(path)) == config == ChatTemplateConfig.from_json(path)
    # lmdeploy's documented custom-template file
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps({
        "model_name": "my awesome template", "system": "<|im_start|>system\n",
        "meta_instruction": "You are a robot developed by LMDeploy.", "eosys": "<|im_end|>\n",
        "user": "<|im_start|>user\n", "eoh": "<|im_end|>\n", "assistant": "<|im_start|>assistant\n",
        "eoa": "<|im_end|>", "separator": "\n", "capability": "chat", "stop_words": ["<|im_end|>"]}))
    template = ChatTemplateConfig.from_json(str(custom)).chat_template
    assert template.messages2prompt([U1]) == ("<|im_start|>system\nYou are a robot developed by LMDeploy.<|im_end|>\n"
                                              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_json_errors(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        ChatTemplateConfig.from_json('{"model_name": "qwen",')
    with pytest.raises(ValueError, match="unknown fields"):
        ChatTemplateConfig.from_json('{"model_name": "qwen", "colour": "red"}')
    with pytest.raises(ValueError, match="neither a JSON file"):
        ChatTemplateConfig.from_json(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="JSON string or a file path"):
        ChatTemplateConfig.from_json({"model_name": "qwen"})
    with pytest.raises(ValueError, match="unknown chat template 'nope'"):
        ChatTemplateConfig.from_json('{"model_name": "nope"}')


@pytest.mark.parametrize("path,name", [
    ("internlm/internlm2-chat-7b", "internlm2"), ("internlm/internlm2_5-7b-chat", "internlm2"),
    ("internlm/internlm-chat-7b", "internlm"), ("Qwen/Qwen2.5-0.5B-Instruct", "qwen"),
    ("meta-llama/Llama-2-7b-chat-hf", "llama2"), ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama3_1"), ("meta-llama/Llama-3.2-1B-Instruct", "llama3_1"),
    ("lmsys/vicuna-7b-v1.5", "vicuna"), ("mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
    ("/models/gemma-2b-it", "gemma"), ("01-ai/Yi-6B-Chat", "yi"), ("microsoft/Phi-3-mini-4k-instruct", "phi-3"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", None), ("/tmp/tiny/llama-s0", None),
])
def test_best_match_model(path, name):
    assert best_match_model(path) == name


# ---- the model's own Jinja template -------------------------------------------------------------------------

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's template (the default model), as its GGUF file carries it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
    "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
TOOLS_TEMPLATE = (  # an end-of-turn marker no list knows, and tools in the system block
    "{% if tools %}<|turn_start|>tools\n{{ tools | tojson }}<|turn_end|>\n{% endif %}"
    "{% for m in messages %}{{ '<|turn_start|>' + m['role'] + '\n' + m['content'] + '<|turn_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|turn_start|>",
            "<|turn_end|>"]


def make_tokenizer(chat_template, bos_token=None, eos_token="<|im_end|>"):
    """A tiny word-level fast tokenizer whose vocabulary is the special tokens (enough to render templates)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(SPECIALS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos_token, eos_token=eos_token,
                                   additional_special_tokens=SPECIALS[1:])
    fast.chat_template = chat_template
    return fast


def render(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def run_session(template, stop_token, full_render, use_strings=False):
    """Feeds a three-turn chat turn by turn, as a session does, and checks the KV text against the full render
    after every turn: first prompt + reply + stop token + continuation == render of the whole conversation."""
    turns = [("Hi", "Hello!"), ("  How are you?", "Fine, thanks."), ("Bye", None)]
    history, kv = [], ""
    for i, (user, reply) in enumerate(turns):
        history.append({"role": "user", "content": user})
        new = user if use_strings else [history[-1]]
        kv += template.messages2prompt(new, sequence_start=i == 0)
        assert kv == full_render(history)
        if reply is not None:
            history.append({"role": "assistant", "content": reply})
            kv += reply + stop_token


@pytest.mark.parametrize("use_strings", [False, True])
@pytest.mark.parametrize("chat_template,bos,eos,stop,stop_words", [
    (SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>", "<|im_end|>", ["<|im_end|>"]),
    (LLAMA3_STYLE_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", ["<|end_of_text|>", "<|eot_id|>"]),
    (GEMMA_STYLE_TEMPLATE, "<bos>", "<eos>", "<end_of_turn>", ["<eos>", "<end_of_turn>"]),
    (TOOLS_TEMPLATE, None, "<|end_of_text|>", "<|turn_end|>", ["<|end_of_text|>", "<|turn_end|>"]),
], ids=["smollm2", "llama3-style", "gemma-style", "own-marker"])
def test_hf_template_session_continuation(chat_template, bos, eos, stop, stop_words, use_strings):
    tokenizer = make_tokenizer(chat_template, bos_token=bos, eos_token=eos)
    template = get_chat_template("/models/anything", tokenizer, None)
    assert isinstance(template, HFChatTemplate)
    assert template.stop_words == stop_words
    run_session(template, stop, lambda history: render(tokenizer, history), use_strings)


def test_hf_template_renders_like_transformers():
    tokenizer = make_tokenizer(SMOLLM2_TEMPLATE)
    template = HFChatTemplate(tokenizer)
    assert template.messages2prompt([U1]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert template.get_prompt("Hi") == template.messages2prompt([U1])
    for messages in ([SYS, U1, A1, U2], [U1, A1, U2]):
        assert template.messages2prompt(messages) == render(tokenizer, messages)
    # a final assistant message is a reply to continue: the prompt ends with its content, verbatim
    partial = {"role": "assistant", "content": "Sure, "}
    assert template.messages2prompt([U1, partial]) == render(tokenizer, [U1])[:-len("<|im_start|>assistant\n")] + \
        "<|im_start|>assistant\nSure, "
    assert template.messages2prompt([partial], sequence_start=False) == "\n<|im_start|>assistant\nSure, "


def test_hf_template_passes_tools():
    tokenizer = make_tokenizer(TOOLS_TEMPLATE, eos_token="<|end_of_text|>")
    template = HFChatTemplate(tokenizer)
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert template.messages2prompt([U1], tools=tools) == (
        '<|turn_start|>tools\n[{"type": "function", "function": {"name": "f"}}]<|turn_end|>\n'
        "<|turn_start|>user\nHi<|turn_end|>\n<|turn_start|>assistant\n")
    # a live session already holds the tools block
    assert template.messages2prompt([U2], sequence_start=False, tools=tools) == (
        "\n<|turn_start|>user\nBye<|turn_end|>\n<|turn_start|>assistant\n")


def test_hf_template_trimmed_content_and_errors():
    tokenizer = make_tokenizer(GEMMA_STYLE_TEMPLATE, bos_token="<bos>", eos_token="<eos>")
    template = HFChatTemplate(tokenizer)
    reply = {"role": "assistant", "content": "  Sure"}  # the template trims content; the prefix keeps it as given
    assert template.messages2prompt([U1, reply]) == ("<bos><start_of_turn>user\nHi<end_of_turn>\n"
                                                     "<start_of_turn>model\n  Sure")
    with pytest.raises(ValueError, match="System role not supported"):
        template.messages2prompt([SYS, U1])
    with pytest.raises(ValueError, match="chat_template"):
        HFChatTemplate(make_tokenizer(None))
    assert HFChatTemplate(tokenizer, stop_words=["<x>"]).stop_words == ["<x>"]


@pytest.mark.parametrize("name,stop", [("qwen", "<|im_end|>"), ("internlm2", "<|im_end|>"), ("llama3", "<|eot_id|>"),
                                       ("llama3_1", "<|eot_id|>"), ("llama2", "</s>"), ("vicuna", "</s>"),
                                       ("mistral", "</s>"), ("internlm", "<eoa>"), ("gemma", "<end_of_turn>"),
                                       ("phi-3", "<|end|>"), ("yi", "<|im_end|>")])
def test_builtin_session_continuation(name, stop):
    template = ChatTemplateConfig(name).chat_template
    run_session(template, stop, template.messages2prompt)
    if name != "llama3_1":  # its string prompts omit the knowledge date its message prompts carry
        run_session(template, stop, template.messages2prompt, use_strings=True)


def test_get_chat_template_precedence():
    hf_tokenizer = make_tokenizer(SMOLLM2_TEMPLATE)
    plain_tokenizer = make_tokenizer(None)
    qwen_path = "/models/Qwen2.5-0.5B-Instruct"
    # the model's own template is the default, even where a built-in matches the path
    assert isinstance(get_chat_template(qwen_path, hf_tokenizer, None), HFChatTemplate)
    # an explicit config wins over it
    explicit = get_chat_template(qwen_path, hf_tokenizer, ChatTemplateConfig("llama3"))
    assert explicit.messages2prompt([U1]) == EXPECTED["llama3"][0]
    # no template in the tokenizer: the path's match, then 'base'
    assert get_chat_template(qwen_path, plain_tokenizer, None).messages2prompt([U1]) == EXPECTED["qwen"][0]
    assert get_chat_template("/models/tiny", plain_tokenizer, None).messages2prompt([U1, A1, U2]) == "HiHello!Bye"
    assert get_chat_template(None, None, None).get_prompt("Hi") == "Hi"
    # model_name=None: the path's built-in with the config's overrides
    overridden = get_chat_template(qwen_path, hf_tokenizer, ChatTemplateConfig(None, meta_instruction="Bob."))
    assert overridden.messages2prompt([U1]).startswith("<|im_start|>system\nBob.<|im_end|>\n")
    with pytest.raises(ValueError, match="no model_name"):
        get_chat_template("/models/tiny", hf_tokenizer, ChatTemplateConfig(None, meta_instruction="Bob."))
    # 'hf' names the model's own template, with the config's stop words
    hf = get_chat_template(qwen_path, hf_tokenizer, ChatTemplateConfig("hf", stop_words=["<|im_end|>", "###"]))
    assert isinstance(hf, HFChatTemplate) and hf.stop_words == ["<|im_end|>", "###"]


def test_default_model_template():
    model_path = pytest.importorskip("lmwrap_engine.model_path")
    from transformers import AutoTokenizer

    path = model_path.resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = get_chat_template(path, tokenizer, None)
    assert isinstance(template, HFChatTemplate)
    assert "<|im_end|>" in template.stop_words
    assert template.messages2prompt([U1]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    run_session(template, "<|im_end|>", lambda history: render(tokenizer, history))
