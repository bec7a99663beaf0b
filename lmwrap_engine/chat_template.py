"""Chat templates: lmdeploy v0.6.2's built-ins, the model's own Jinja template, and the choice between them.

A template turns a conversation into prompt text. With ``sequence_start=False`` it renders only the
text to append to a live session, whose KV already ends with the previous reply and the stop token
that ended it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple, Union

Messages = Union[str, List[dict]]

ROLE_FIELDS = ("system", "eosys", "user", "eoh", "assistant", "eoa")
CAPABILITIES = ("completion", "infilling", "chat", "python")
HF_TEMPLATE_NAME = "hf"  # the model's own Jinja template (lmdeploy's later default name)


@dataclass
class ChatTemplateConfig:
    """Names a chat template and overrides its fields (lmdeploy's ``ChatTemplateConfig``).

    ``model_name`` is a built-in (``list_chat_template_names()``), ``'hf'`` (the model's own Jinja
    template; resolved by ``get_chat_template``, which has the tokenizer), or ``None`` (the built-in
    that matches the model path). Fields that are not None replace the template's own. A name that is
    not built in defines a custom template, which needs every role field: system, eosys, user, eoh,
    assistant, eoa. ``capability='completion'`` sends string prompts unchanged.
    """

    model_name: Optional[str]
    system: Optional[str] = None
    meta_instruction: Optional[str] = None
    eosys: Optional[str] = None
    user: Optional[str] = None
    eoh: Optional[str] = None
    assistant: Optional[str] = None
    eoa: Optional[str] = None
    separator: Optional[str] = None
    capability: Optional[str] = None
    stop_words: Optional[List[str]] = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "stop_words" and value is not None and not isinstance(value, str):
                raise ValueError(f"ChatTemplateConfig.{f.name} must be a str or None, got {value!r}")
        if isinstance(self.stop_words, str):
            self.stop_words = [self.stop_words]
        elif self.stop_words is not None:
            if not isinstance(self.stop_words, (list, tuple)) or not all(
                    isinstance(w, str) and w for w in self.stop_words):
                raise ValueError(f"ChatTemplateConfig.stop_words must be a list of non-empty strings, "
                                 f"got {self.stop_words!r}")
            self.stop_words = list(self.stop_words)
        if self.capability is not None and self.capability not in CAPABILITIES:
            raise ValueError(f"ChatTemplateConfig.capability must be one of {CAPABILITIES} or None, "
                             f"got {self.capability!r}")
        if self.model_name not in (None, HF_TEMPLATE_NAME) and self.model_name not in _BUILTINS:
            self._check_custom()

    def _check_custom(self) -> None:
        missing = [name for name in ROLE_FIELDS if getattr(self, name) is None]
        if missing:
            subject = ("ChatTemplateConfig has no model_name" if self.model_name is None
                       else f"unknown chat template {self.model_name!r}")
            raise ValueError(f"{subject}: name one of {list_chat_template_names()} (or {HF_TEMPLATE_NAME!r}), "
                             f"or define a custom template by giving all of {list(ROLE_FIELDS)} "
                             f"(missing: {missing})")

    @property
    def chat_template(self) -> "BaseChatTemplate":
        """The named built-in with this config's fields overriding its own, or the custom template."""
        if self.model_name == HF_TEMPLATE_NAME:
            raise ValueError("chat template 'hf' is the model's own Jinja template and needs its tokenizer: "
                             "use get_chat_template(model_path, tokenizer, config)")
        overrides = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "model_name"}
        if self.model_name in _BUILTINS:
            return _BUILTINS[self.model_name](**overrides)
        self._check_custom()
        return BaseChatTemplate(**overrides)

    def to_json(self, file_path: Optional[str] = None) -> str:
        """This config as a JSON string, also written to ``file_path`` when given."""
        text = json.dumps(dataclasses.asdict(self), ensure_ascii=False, indent=4)
        if file_path:
            with open(file_path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, file_or_string: str) -> "ChatTemplateConfig":
        """A config from a JSON file path or a JSON string (as written by ``to_json``)."""
        if not isinstance(file_or_string, (str, os.PathLike)):
            raise ValueError(f"from_json takes a JSON string or a file path, got {type(file_or_string).__name__}")
        text = file_or_string = os.fspath(file_or_string)
        if not file_or_string.lstrip().startswith("{"):
            if not os.path.isfile(file_or_string):
                raise ValueError(f"chat template config {file_or_string!r} is neither a JSON file nor a JSON object")
            with open(file_or_string, encoding="utf-8") as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"chat template config is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"chat template config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"chat template config has unknown fields {unknown}")
        data.setdefault("model_name", None)
        return cls(**data)


class BaseChatTemplate:
    """A chat format made of role markers (lmdeploy's ``BaseChatTemplate``).

    A message renders as ``begin + content + end`` of its role: system (``system``/``eosys``), user
    (``user``/``eoh``), assistant (``assistant``/``eoa + separator``). ``meta_instruction`` is the
    default system prompt, added when the conversation does not open with its own system message
    (None: no system block at all). The prompt ends by opening the assistant's turn, unless the last
    message is the assistant's: then it ends with that message's content, for the model to continue.
    """

    def __init__(self, system: str = "", meta_instruction: Optional[str] = "", eosys: str = "", user: str = "",
                 eoh: str = "", assistant: str = "", eoa: str = "", separator: str = "", capability: str = "chat",
                 stop_words: Optional[List[str]] = None, *, sequence_prefix: str = "",
                 trim_generation_prompt: bool = False):
        self.system = system
        self.meta_instruction = meta_instruction
        self.eosys = eosys
        self.user = user
        self.eoh = eoh
        self.assistant = assistant
        self.eoa = eoa
        self.separator = separator
        self.capability = capability
        self.stop_words: List[str] = list(stop_words or [])
        self.sequence_prefix = sequence_prefix  # text that starts every sequence, e.g. '<|begin_of_text|>'
        # lmdeploy's llava-v1/deepseek family open the assistant's turn without the marker's final space.
        self.trim_generation_prompt = trim_generation_prompt

    def get_prompt(self, prompt: str, sequence_start: bool = True) -> str:
        """One user turn as prompt text: the first of a session, or (``sequence_start=False``) a later one."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        if self.capability == "completion":
            return prompt
        turn = f"{self.user}{prompt}{self.eoh}{self._generation_prompt()}"
        if not sequence_start:
            return self._continuation() + turn
        return self.sequence_prefix + self._default_system() + turn

    def messages2prompt(self, messages: Messages, sequence_start: bool = True, tools: Optional[list] = None,
                        **kwargs) -> str:
        """A conversation (a str is one user turn) as prompt text.

        ``sequence_start=False`` renders only what to append to a live session: the text that
        follows the previous reply's stop token, then the new messages, without a system block.
        """
        if isinstance(messages, str):
            return self.get_prompt(messages, sequence_start)
        messages = self._checked(messages)
        if not sequence_start:
            text = self._continuation()
        elif messages and messages[0]["role"] != "system":
            text = self.sequence_prefix + self._system_block(tools)
        else:
            text = self.sequence_prefix
        messages = self._with_tools(messages, tools)
        ends_with_reply = bool(messages) and messages[-1]["role"] == "assistant"
        roles = self._roles()
        for i, message in enumerate(messages):
            begin, end = roles[message["role"]]
            if ends_with_reply and i == len(messages) - 1:
                end = ""
            text += self._render(message, begin, end, tools)
        return text if ends_with_reply else text + self._generation_prompt()

    def _roles(self) -> Dict[str, Tuple[str, str]]:
        return {"system": (self.system, self.eosys), "user": (self.user, self.eoh),
                "assistant": (self.assistant, self.eoa + self.separator)}

    def _default_system(self) -> str:
        return "" if self.meta_instruction is None else f"{self.system}{self.meta_instruction}{self.eosys}"

    def _system_block(self, tools: Optional[list]) -> str:
        return self._default_system()

    def _with_tools(self, messages: List[dict], tools: Optional[list]) -> List[dict]:
        return messages

    def _render(self, message: dict, begin: str, end: str, tools: Optional[list]) -> str:
        return f"{begin}{message['content']}{end}"

    def _generation_prompt(self) -> str:
        return self.assistant[:-1] if self.trim_generation_prompt else self.assistant

    def _continuation(self) -> str:
        # The KV ends with the reply's stop token; when eoa starts with that token, only the rest of
        # eoa is still missing. Otherwise lmdeploy's rule: the separator alone.
        for word in sorted(self.stop_words, key=len, reverse=True):
            if self.eoa.startswith(word):
                return self.eoa[len(word):] + self.separator
        return self.separator

    def _checked(self, messages) -> List[dict]:
        return _checked_messages(messages, self._roles())


class InternLM2ChatTemplate(BaseChatTemplate):
    """InternLM2: adds environment/tool roles, ``name`` plugin/interpreter markers, tools and tool calls."""

    def __init__(self, environment: str = "<|im_start|>environment\n", eoenv: str = "<|im_end|>\n",
                 plugin: str = "<|plugin|>", interpreter: str = "<|interpreter|>", **kwargs):
        super().__init__(**kwargs)
        self.environment = environment
        self.eoenv = eoenv
        self.plugin = plugin
        self.interpreter = interpreter

    def _roles(self):
        environment = (self.environment, self.eoenv)
        return {**super()._roles(), "environment": environment, "tool": environment}

    def _with_tools(self, messages, tools):
        if not tools:
            return messages
        plugin = {"role": "system", "name": "plugin", "content": json.dumps(tools, ensure_ascii=False)}
        at = 1 if messages and messages[0]["role"] == "system" else 0
        return messages[:at] + [plugin] + messages[at:]

    def _render(self, message, begin, end, tools):
        content = message["content"]
        if message["role"] == "assistant":
            for call in message.get("tool_calls") or []:
                spec = call.get("function", {})
                function = {k: v for k, v in spec.items() if k not in ("parameters", "arguments")}
                function["arguments"] = spec.get("parameters", spec.get("arguments", {}))
                content += f"<|action_start|><|plugin|>\n{json.dumps(function)}<|action_end|>"
        name = {"plugin": self.plugin, "interpreter": self.interpreter}.get(message.get("name"))
        if name is not None:
            begin = begin.strip() + f" name={name}\n"
        return f"{begin}{content}{end}"


LLAMA3_1_TOOLS = """# Tool Instructions
- Always execute python code in messages that you share.
- When looking for real time information use relevant functions if available else fallback to brave_search



You have access to the following functions:

"""
LLAMA3_1_EOTOOLS = """

If a you choose to call a function ONLY reply in the following format:
<{start_tag}={function_name}>{parameters}{end_tag}
where

start_tag => `<function`
parameters => a JSON dict with the function argument name as key and function argument value as value.
end_tag => `</function>`

Here is an example,
<function=example_function_name>{"example_name": "example_value"}</function>

Reminder:
- Function calls MUST follow the specified format
- Required parameters MUST be specified
- Only call one function at a time
- Put the entire function call reply on one line"
- Always add your sources when using search results to answer the user query\n\n"""


class Llama31ChatTemplate(BaseChatTemplate):
    """Llama 3.1/3.2: a knowledge-date system block, ipython/tool roles, and function tools."""

    def __init__(self, tools: str = LLAMA3_1_TOOLS, eotools: str = LLAMA3_1_EOTOOLS,
                 knowledge: str = "Cutting Knowledge Date: December 2023\nToday Date: 23 Jul 2024\n\n",
                 ipython: str = "<|start_header_id|>ipython<|end_header_id|>\n\n", eoi: str = "<|eot_id|>", **kwargs):
        super().__init__(**kwargs)
        self.tools = tools
        self.eotools = eotools
        self.knowledge = knowledge
        self.ipython = ipython
        self.eoi = eoi

    def _roles(self):
        ipython = (self.ipython, self.eoi)
        return {**super()._roles(), "ipython": ipython, "tool": ipython}

    def _tool_text(self, tools: list) -> str:
        described = "".join(f"Use the function '{t['name']}' to: {t['description']}\n"
                            f"{json.dumps(t, ensure_ascii=False)}\n" for t in tools)
        return f"{self.tools}{described}{self.eotools}"

    def _system_block(self, tools):
        if self.meta_instruction is None:
            return ""
        tool_text = "" if tools is None else self._tool_text(tools)
        return f"{self.system}{self.knowledge}{tool_text}{self.meta_instruction}{self.eosys}"

    def _render(self, message, begin, end, tools):
        content = message["content"]
        if message["role"] == "assistant" and ("<|python_tag|>" in content or "</function>" in content):
            return f"{begin}{content}{'<|eom_id|>' if end else ''}"
        if message["role"] == "system" and tools is not None:
            content = self._tool_text(tools) + content
        return f"{begin}{content}{end}"


class CodeLlamaTemplate(BaseChatTemplate):
    """CodeLlama: chat (Llama 2 format), completion/python (prompt unchanged), or infilling ('<FILL>')."""

    def __init__(self, suffix_first: bool = False, **kwargs):
        super().__init__(**kwargs)
        if self.capability not in CAPABILITIES:
            raise ValueError(f"codellama capability must be one of {CAPABILITIES}, got {self.capability!r}")
        self.suffix_first = suffix_first
        if self.capability == "infilling" and not self.stop_words:
            self.stop_words = ["<EOT>"]

    def get_prompt(self, prompt, sequence_start=True):
        if self.capability == "chat":
            return super().get_prompt(prompt, sequence_start)
        if self.capability != "infilling":
            return prompt
        if prompt.count("<FILL>") != 1:
            raise ValueError("an infilling prompt must contain '<FILL>' exactly once")
        prefix, suffix = prompt.split("<FILL>")
        return f"<PRE> <SUF>{suffix} <MID> {prefix}" if self.suffix_first else f"<PRE> {prefix} <SUF>{suffix} <MID>"


class HFChatTemplate(BaseChatTemplate):
    """The model's own Jinja chat template (``tokenizer.chat_template``), rendered by the tokenizer.

    Stop words default to the tokenizer's eos token plus the end-of-turn marker the template puts
    after an assistant message. Continuing a session (``sequence_start=False``) renders a probe
    conversation with the new messages appended and keeps what follows the probe's reply, minus
    the stop token already in the KV, so that first prompt + reply + stop token + continuation is
    the template's render of the whole conversation.
    """

    _REPLY = "LMWRAPREPLYSENTINEL"
    _FINAL = "LMWRAPFINALSENTINEL"
    _KNOWN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                          "<|END_OF_TURN_TOKEN|>", "<｜end▁of▁sentence｜>")

    def __init__(self, tokenizer, stop_words: Optional[List[str]] = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; name a built-in chat template instead")
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError(f"{type(tokenizer).__name__} has no apply_chat_template; pass a transformers tokenizer")
        super().__init__(stop_words=stop_words)
        self.tokenizer = tokenizer
        if stop_words is None:
            self.stop_words = self._default_stop_words()

    def get_prompt(self, prompt: str, sequence_start: bool = True) -> str:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        return self.messages2prompt([{"role": "user", "content": prompt}], sequence_start)

    def messages2prompt(self, messages, sequence_start=True, tools=None, **kwargs):
        if isinstance(messages, str):
            return self.get_prompt(messages, sequence_start)
        messages = self._checked(messages)
        if not messages:
            raise ValueError("messages must not be empty")
        if sequence_start:
            return self._render_conversation(messages, tools)
        probe = [{"role": "user", "content": "U"}, {"role": "assistant", "content": self._REPLY}]
        text = self._render_conversation(probe + messages, tools)
        if text.count(self._REPLY) != 1:
            raise ValueError("this chat template does not render an assistant reply verbatim; "
                             "a session cannot be continued with it")
        continuation = text[text.index(self._REPLY) + len(self._REPLY):]
        for word in sorted(self.stop_words, key=len, reverse=True):
            if continuation.startswith(word):
                return continuation[len(word):]
        return continuation

    def _render_conversation(self, messages: List[dict], tools: Optional[list]) -> str:
        if messages[-1]["role"] != "assistant":
            return self._apply(messages, tools, add_generation_prompt=True)
        # The reply to continue: the template's render up to that message's content, then the content as is.
        final = messages[-1]
        text = self._apply(messages[:-1] + [{**final, "content": self._FINAL}], tools, add_generation_prompt=False)
        if self._FINAL not in text:
            raise ValueError("this chat template does not render the final assistant message verbatim")
        return text[:text.index(self._FINAL)] + final["content"]

    def _apply(self, messages, tools, add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # includes the template's own raise_exception(...)
            raise ValueError(f"the model's chat template rejected the messages: {e}") from None

    def _checked(self, messages):
        return _checked_messages(messages, roles=None)

    def _default_stop_words(self) -> List[str]:
        words = [getattr(self.tokenizer, "eos_token", None)]
        probe = [{"role": "user", "content": "U"}, {"role": "assistant", "content": self._REPLY}]
        try:
            text = self._apply(probe, None, add_generation_prompt=False)
        except ValueError:  # a template may reject the probe (e.g. it demands a system message)
            text = ""
        after_reply = text[text.index(self._REPLY) + len(self._REPLY):].lstrip() if self._REPLY in text else ""
        special = sorted(self._special_tokens(), key=len, reverse=True)
        words.append(next((t for t in special if after_reply.startswith(t)), None))
        template = self.tokenizer.chat_template
        template = template if isinstance(template, str) else json.dumps(template)
        words += [m for m in self._KNOWN_END_MARKERS if m in template]
        return list(dict.fromkeys(w for w in words if w))

    def _special_tokens(self) -> List[str]:
        tokens = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        get_added = getattr(self.tokenizer, "get_added_vocab", None)
        if get_added is not None:
            tokens.update(get_added())
        return [t for t in tokens if isinstance(t, str) and t.strip()]


def _checked_messages(messages, roles: Optional[Dict[str, Tuple[str, str]]]) -> List[dict]:
    """Copies of the messages with their content as text; unknown roles are errors when ``roles`` is given."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a str or a list of dicts, got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a str 'role', got {message!r}")
        if roles is not None and message["role"] not in roles:
            raise ValueError(f"messages[{i}] has role {message['role']!r}, which this chat template does not "
                             f"know (roles: {sorted(roles)})")
        checked.append({**message, "content": _text_of(message.get("content"), i)})
    return checked


def _text_of(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # OpenAI content parts
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}] content part {part!r} is not text; only text is supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"messages[{index}] content must be a str, got {type(content).__name__}")


# Built-ins, with lmdeploy v0.6.2's strings. Each entry builds a template; ChatTemplateConfig's fields
# are keyword overrides.
_BUILTINS: Dict[str, Callable[..., BaseChatTemplate]] = {}


def _register(names: str, cls=BaseChatTemplate, **defaults) -> None:
    for name in names.split():
        _BUILTINS[name] = partial(cls, **defaults)


CHATML = dict(system="<|im_start|>system\n", eosys="<|im_end|>\n", user="<|im_start|>user\n", eoh="<|im_end|>\n",
              assistant="<|im_start|>assistant\n", eoa="<|im_end|>", separator="\n")
INTERNLM_META = """You are an AI assistant whose name is InternLM (书生·浦语).
- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.
- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as English and 中文.
"""  # noqa: E501
INTERNVL2_META = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
VICUNA = dict(meta_instruction="A chat between a curious user and an artificial intelligence assistant. The assistant "
                               "gives helpful, detailed, and polite answers to the user's questions.",
              eosys=" ", user="USER: ", eoh=" ", assistant="ASSISTANT: ", eoa="</s>", stop_words=["</s>"])
LLAMA2 = dict(system="[INST] <<SYS>>\n", eosys="\n<</SYS>>\n\n", assistant=" [/INST] ", eoa="</s>",
              separator="<s>[INST] ", meta_instruction="""\
You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.

If a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.""")  # noqa: E501
LLAMA3 = dict(system="<|start_header_id|>system<|end_header_id|>\n\n", meta_instruction=None, eosys="<|eot_id|>",
              user="<|start_header_id|>user<|end_header_id|>\n\n", eoh="<|eot_id|>",
              assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", eoa="<|eot_id|>",
              stop_words=["<|eot_id|>", "<|end_of_text|>"], sequence_prefix="<|begin_of_text|>")
PHI3 = dict(system="<|system|>\n", meta_instruction=None, eosys="<|end|>\n", user="<|user|>\n", eoh="<|end|>\n",
            assistant="<|assistant|>\n", eoa="<|end|>\n", stop_words=["<|end|>", "<|endoftext|>", "<|assistant|>"])
CHATGLM3 = dict(system="<|system|>\n ", meta_instruction=None, user="<|user|>\n ", assistant="<|assistant|>\n ",
                stop_words=["<eos>"], sequence_prefix="[gMASK]sop")
DBRX_META = (
    "You are DBRX, created by Databricks. You were last updated in December 2023. You answer questions based on "
    "information available up to that point.\nYOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but "
    "provide thorough responses to more complex and open-ended questions.\nYou assist with various tasks, from "
    "writing to coding (using markdown for code blocks — remember to use ``` with code, JSON, and tables).\n(You do "
    "not have real-time data access or code execution capabilities. You avoid stereotyping and provide balanced "
    "perspectives on controversial topics. You do not provide song lyrics, poems, or news articles and do not "
    "divulge details of your training data.)\nThis is your system prompt, guiding your responses. Do not reference "
    "it, just respond to the user. If you find yourself talking about this message, stop. You should be responding "
    "appropriately and usually that means not mentioning this.\nYOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT "
    "YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER\\'S QUERY.")

_register("base llama falcon puyu")
_register("cogvlm", meta_instruction="", user="Question: ", eoh=" ", assistant="Answer:", eoa="</s>", separator="\n",
          stop_words=["</s>"])
_register("cogvlm2", meta_instruction="", user="Question: ", eoh=" ", assistant="Answer:", eoa="<|end_of_text|>",
          separator="\n", stop_words=["<|end_of_text|>"])
_register("vicuna wizardlm", **VICUNA)
_register("llava-v1", **{**VICUNA, "meta_instruction": (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.")}, trim_generation_prompt=True)
_register("mini-gemini-vicuna", **VICUNA, trim_generation_prompt=True)
_register("internlm", system="<|System|>:", meta_instruction=INTERNLM_META, eosys="\n", user="<|User|>:", eoh="\n",
          assistant="<|Bot|>:", eoa="<eoa>", separator="\n", stop_words=["<eoa>"])
_register("internlm2", InternLM2ChatTemplate, **CHATML, meta_instruction=INTERNLM_META,
          stop_words=["<|im_end|>", "<|action_end|>"])
_register("internvl-internlm2", InternLM2ChatTemplate, **CHATML,
          meta_instruction="You are an AI assistant whose name is InternLM (书生·浦语).",
          stop_words=["<|im_end|>", "<|action_end|>"])
_register("internvl2-internlm2", InternLM2ChatTemplate, **{**CHATML, "eosys": "<|im_end|>", "eoh": "<|im_end|>",
                                                          "separator": ""},
          meta_instruction=INTERNVL2_META, stop_words=["<|im_start|>", "<|im_end|>"])
_register("internlm-xcomposer2 internlm-xcomposer2d5", system="[UNUSED_TOKEN_146]system\n",
          meta_instruction="""You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).
- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.
- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user such as English and 中文.
- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on the provided image.""",  # noqa: E501
          user="[UNUSED_TOKEN_146]user\n", assistant="[UNUSED_TOKEN_146]assistant\n", eosys="[UNUSED_TOKEN_145]\n",
          eoh="[UNUSED_TOKEN_145]\n", eoa="[UNUSED_TOKEN_145]\n", separator="\n", stop_words=["[UNUSED_TOKEN_145]"])
_register("baichuan2", user="<reserved_106>", assistant="<reserved_107>")
_register("llama2", **LLAMA2)
_register("codellama", CodeLlamaTemplate, **{**LLAMA2, "meta_instruction": ""})
_register("llama3", **LLAMA3)
_register("llama3_1 llama3_2", Llama31ChatTemplate, **{**LLAMA3, "meta_instruction": "You are a helpful assistant.",
                                                       "stop_words": ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]})
_register("qwen chatml minicpm3 minicpmv-2d6", **CHATML, meta_instruction="You are a helpful assistant.",
          stop_words=["<|im_end|>"])
_register("solar", system="### System:\n", eosys="\n\n", user="### User:\n", eoh="\n\n", assistant="### Assistant:\n")
_register("ultracm ultralm", system="User: ", eosys="</s>\n", user="User: ", eoh="</s>\n", assistant="Assistant: ",
          eoa="</s>", separator="\n", stop_words=["</s>"],
          meta_instruction="A one-turn chat between a curious user and an artificial intelligence assistant. The "
                           "assistant gives helpful, very detailed, and polite answers to the user's questions.")
_register("yi", **CHATML, meta_instruction=None, stop_words=["<|im_end|>", "<|endoftext|>"])
_register("mistral mixtral", user="[INST] ", eoh=" [/INST]", eoa="</s>")
_register("gemma", user="<start_of_turn>user\n", eoh="<end_of_turn>\n", assistant="<start_of_turn>model\n",
          eoa="<end_of_turn>\n", stop_words=["<end_of_turn>"])
_register("deepseek", user="User: ", eoh="\n\n", assistant="Assistant: ", eoa="<｜end▁of▁sentence｜>",
          trim_generation_prompt=True)
_register("internvl-zh", user="<human>: ", eoh=" ", assistant="<bot>: ", eoa="</s>", trim_generation_prompt=True)
_register("deepseek-vl", eosys="\n\n", user="User: ", eoh="\n\n", assistant="Assistant: ",
          eoa="<｜end▁of▁sentence｜>", trim_generation_prompt=True,
          meta_instruction="You are a helpful language and vision assistant. You are able to understand the visual "
                           "content that the user provides, and assist the user with a variety of tasks using "
                           "natural language.")
_register("deepseek-coder", user="### Instruction:\n", eoh="\n", assistant="### Response:\n", eoa="\n<|EOT|>",
          separator="\n", stop_words=["<|EOT|>"],
          meta_instruction="You are an AI programming assistant, utilizing the Deepseek Coder model, developed by "
                           "Deepseek Company, and you only answer questions related to computer science. For "
                           "politically sensitive questions, security and privacy issues, and other non-computer "
                           "science questions, you will refuse to answer\n")
_register("yi-vl", user="### Human: ", eoh="\n", assistant="### Assistant:", eoa="\n", stop_words=["###"],
          meta_instruction="This is a chat between an inquisitive human and an AI assistant. Assume the role of the "
                           "AI assistant. Read all the images carefully, and respond to the human's questions with "
                           "informative, helpful, detailed and polite answers. 这是一个好奇的人类和一个人工智能助手之间的对话。"
                           "假设你扮演这个AI助手的角色。仔细阅读所有的图像，并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。\n\n")
_register("dbrx", **CHATML, meta_instruction=DBRX_META)
_register("llava-chatml internvl-zh-hermes2", **{**CHATML, "eosys": "<|im_end|>", "eoh": "<|im_end|>",
                                                 "separator": ""}, meta_instruction="Answer the questions.")
_register("phi-3", **PHI3)
_register("internvl2-phi3", **{**PHI3, "meta_instruction": INTERNVL2_META})
_register("internvl-phi3", **{**PHI3, "eosys": "<|end|>", "eoh": "<|end|>", "eoa": "<|end|>",
                              "meta_instruction": "You are an AI assistant whose name is Phi-3."})
_register("chatglm3", **CHATGLM3)
_register("glm4", **{**CHATGLM3, "system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n",
                     "stop_words": ["<|user|>", "<|endoftext|>", "<|observation|>"],
                     "sequence_prefix": "[gMASK]<sop>"})
_register("codegeex4", system="<|system|>\n", user="<|user|>\n", assistant="<|assistant|>\n",
          stop_words=["<|endoftext|>", "<|user|>", "<|observation|>"],
          meta_instruction="你是一位智能编程助手，你叫CodeGeeX。你会为用户回答关于编程、代码、计算机方面的任何问题，"
                           "并提供格式规范、可以执行、准确安全的代码，并在必要时提供详细的解释。")

# lmdeploy's matchers, in its registry order: the first that accepts the lower-cased path names the template.
_MATCHERS: Tuple[Tuple[str, Callable[[str], bool]], ...] = (
    ("cogvlm", lambda p: "cogvlm" in p and "cogvlm2" not in p),
    ("cogvlm2", lambda p: "cogvlm2" in p),
    ("vicuna", lambda p: "vicuna" in p and "llava" not in p),
    ("wizardlm", lambda p: "wizardlm" in p),
    ("llava-v1", lambda p: ("llava" in p and "v1" in p and "v1.6-34b" not in p and "mistral" not in p)
     or "llava-1.5" in p),
    ("mini-gemini-vicuna", lambda p: any(s in p for s in ("mgm-7b", "mgm-13b", "mgm-34b", "mini-gemini-7b",
                                                          "mini-gemini-13b"))),
    ("internlm", lambda p: "internlm2" not in p and "8k" not in p and "internlm" in p and "chat" in p),
    ("internlm2", lambda p: "internlm2" in p and ("chat" in p or "math" in p)),
    ("internvl-internlm2", lambda p: "internvl" in p and "v1-5" in p and not ("mini" in p and "4b" in p)),
    ("internvl2-internlm2", lambda p: "internvl2" in p and "internvl2-4b" not in p),
    ("internlm-xcomposer2d5", lambda p: "internlm" in p and "xcomposer2" in p and "2d5" in p),
    ("internlm-xcomposer2", lambda p: "internlm" in p and "xcomposer2" in p),
    ("baichuan2", lambda p: "baichuan2" in p and "chat" in p),
    ("puyu", lambda p: "puyu" in p),
    ("llama2", lambda p: "llama-2" in p or "llama2" in p),
    ("llama3", lambda p: "internvl2" not in p and ("llama-3-" in p or "llama3-" in p)),
    ("llama3_1", lambda p: any(s in p for s in ("llama-3.1-", "llama3.1-", "llama-3.2-", "llama3.2-"))),
    ("qwen", lambda p: "qwen" in p),
    ("minicpmv-2d6", lambda p: "minicpm-v-2_6" in p),
    ("minicpm3", lambda p: "minicpm3-" in p),
    ("codellama", lambda p: "codellama" in p),
    ("falcon", lambda p: "falcon" in p),
    ("solar", lambda p: "solar" in p),
    ("ultracm", lambda p: "ultracm" in p),
    ("ultralm", lambda p: "ultralm" in p),
    ("yi", lambda p: "yi" in p and "vl" not in p),
    ("mistral", lambda p: ("instruct" in p or "llava" in p) and "mistral" in p),
    ("mixtral", lambda p: ("instruct" in p or "llava" in p) and "mixtral" in p),
    ("gemma", lambda p: "gemma" in p),
    ("deepseek", lambda p: "deepseek" in p and "chat" in p and "vl" not in p),
    ("internvl-zh", lambda p: "internvl-chat" in p and "v1-1" in p),
    ("deepseek-vl", lambda p: "deepseek-vl" in p and "chat" in p),
    ("deepseek-coder", lambda p: "deepseek-coder" in p),
    ("yi-vl", lambda p: "yi-vl" in p),
    ("dbrx", lambda p: "dbrx" in p),
    ("llava-chatml", lambda p: "llava" in p and "v1.6-34b" in p),
    ("internvl-zh-hermes2", lambda p: "internvl-chat" in p and "v1-2" in p),
    ("phi-3", lambda p: "phi-3" in p and "instruct" in p),
    ("internvl2-phi3", lambda p: "internvl2-4b" in p),
    ("chatglm3", lambda p: "chatglm3" in p),
    ("glm4", lambda p: "glm-4" in p),
    ("codegeex4", lambda p: "codegeex4" in p),
    ("internvl-phi3", lambda p: all(s in p for s in ("mini-internvl-chat", "4b", "v1-5"))),
)


def list_chat_template_names() -> List[str]:
    """The built-in chat template names, sorted."""
    return sorted(_BUILTINS)


def best_match_model(model_path: str) -> Optional[str]:
    """The built-in template whose matcher accepts ``model_path`` (lmdeploy's rules), or None."""
    path = str(model_path).lower()
    return next((name for name, accepts in _MATCHERS if accepts(path)), None)


def get_chat_template(model_path: Optional[str], tokenizer=None,
                      config: Optional[ChatTemplateConfig] = None) -> BaseChatTemplate:
    """The chat template for a model: ``config`` when given, else the model's own Jinja template
    (``tokenizer.chat_template``), else the built-in matching ``model_path``, else ``'base'``."""
    if config is not None:
        if config.model_name == HF_TEMPLATE_NAME:
            return HFChatTemplate(tokenizer, stop_words=config.stop_words)
        if config.model_name is None and model_path is not None and best_match_model(model_path):
            config = dataclasses.replace(config, model_name=best_match_model(model_path))
        return config.chat_template
    if getattr(tokenizer, "chat_template", None):
        return HFChatTemplate(tokenizer)
    name = best_match_model(model_path) if model_path is not None else None
    return _BUILTINS[name or "base"]()
