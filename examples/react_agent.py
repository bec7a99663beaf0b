"""A tool-using lagent agent (ReAct + PythonInterpreter) on the default model, in this process.

    pip install --no-deps lagent==0.2.4   # plus lmwrap's [lagent] extra; never lagent[all]
    python examples/react_agent.py "Compute 17 * 23."

The default model (SmolLM2-135M-Instruct) is tiny: two worked examples in the dialog are what
make it use the tool. Pass --model a bigger local model (HF folder or .gguf) to drop them.
"""
import argparse
import json

from lagent.actions import ActionExecutor, PythonInterpreter
from lagent.agents import ReAct

from lmwrap import LMDeployPipeline

# lagent's own description of this tool is in Chinese; a short English one suits a small model.
PYTHON_TOOL = dict(name='PythonInterpreter',
                   description='Runs Python code. The code must define solution() and return the answer.',
                   parameters=[dict(name='command', type='STRING', description='Python code')],
                   required=['command'])


def worked_example(question: str, expression: str, answer: str) -> list:
    """One ReAct round trip, in the roles ReAct itself writes to its history."""
    action_input = json.dumps({'command': f'def solution():\n    return {expression}'})
    return [
        dict(role='user', content=question),
        dict(role='assistant', content='Thought: I will compute it with Python.\nAction: PythonInterpreter\n'
                                       f'Action Input: {action_input}'),
        dict(role='system', content=f'Response:{answer}\n'),
        dict(role='assistant', content=f'Thought: The tool returned {answer}.\nFinal Answer: {answer}'),
    ]


FEW_SHOT = worked_example('Compute 12 + 30.', '12 + 30', '42') + worked_example('Compute 7 * 8.', '7 * 8', '56')


def build_agent(model=None, **engine_options):
    llm = LMDeployPipeline(path=model, meta_template='auto', pipeline_cfg=engine_options, max_new_tokens=256,
                           top_k=1, temperature=0, stop_words=['<|im_end|>', '<|eot_id|>'])
    agent = ReAct(llm=llm, action_executor=ActionExecutor(actions=[PythonInterpreter(description=PYTHON_TOOL)]))
    return llm, agent


def ask(agent, question: str, few_shot: bool = True):
    return agent.chat((FEW_SHOT if few_shot else []) + [dict(role='user', content=question)])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('question', nargs='?', default='Compute 17 * 23.')
    parser.add_argument('--model', default=None, help='HF folder, .gguf file or alias (default: SmolLM2-135M)')
    parser.add_argument('--no-few-shot', action='store_true', help='ask without the worked examples')
    args = parser.parse_args()

    llm, agent = build_agent(args.model)
    try:
        result = ask(agent, args.question, few_shot=not args.no_few_shot)
    finally:
        llm.close()
    for step in result.inner_steps:
        print(f"[{step['role']}] {step['content']}\n")
    for action in result.actions:
        print(f'tool {action.type}: args={action.args} result={action.result} error={action.errmsg}')
    print('answer:', result.response.strip())


if __name__ == '__main__':
    main()
