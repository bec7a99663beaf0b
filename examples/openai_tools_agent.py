"""A lagent-style agent loop with OpenAI tool calls: ``LMDeployServer`` starts ``lmwrap serve api_server``
on the default model, the agent offers a calculator tool, forces the first step to be a call
(``tool_choice='required'``: the grammar makes even the 135M model write a valid call), runs the tool,
sends the result back as a ``role: "tool"`` message, and lets the model answer (``tool_choice='none'``).

    python examples/openai_tools_agent.py [MODEL] [QUESTION]     # default: SmolLM2-135M-Instruct
"""
import ast
import json
import operator
import sys

from lmwrap import LMDeployServer

CALCULATOR = {
    'type': 'function',
    'function': {
        'name': 'calculator',
        'description': 'Evaluates an arithmetic expression with + - * / and parentheses, e.g. "12 * (3 + 4)".',
        'parameters': {'type': 'object',
                       'properties': {'expression': {'type': 'string', 'pattern': r'^[0-9(][0-9+\-*/(). ]{0,39}$'}},
                       'required': ['expression'], 'additionalProperties': False},
    },
}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """The tool: a safe arithmetic evaluator (no names, no calls)."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError('not arithmetic')
    try:
        return str(value(ast.parse(expression, mode='eval').body))
    except (SyntaxError, ValueError, ZeroDivisionError) as error:
        return f'error: {error}'


TOOLS = {'calculator': calculator}


def run_agent(llm, question: str, max_steps: int = 3) -> str:
    """Calls tools until the model answers in text (the first step must call a tool)."""
    messages = [{'role': 'system', 'content': 'You are a helpful assistant. Use the calculator for arithmetic.'},
                {'role': 'user', 'content': question}]
    for step in range(max_steps):
        choice = 'required' if step == 0 else 'none'
        reply = llm.chat_completion(messages, tools=[CALCULATOR], tool_choice=choice, parallel_tool_calls=False)
        if not reply.get('tool_calls'):
            print(f'answer: {reply["content"]!r} (finish_reason {reply["finish_reason"]})')
            return reply['content']
        messages.append({'role': 'assistant', 'content': reply.get('content'), 'tool_calls': reply['tool_calls']})
        for call in reply['tool_calls']:
            args = json.loads(call['function']['arguments'])
            result = TOOLS[call['function']['name']](**args)
            print(f'tool call: {call["function"]["name"]}({args}) -> {result}  [{call["id"]}]')
            messages.append({'role': 'tool', 'tool_call_id': call['id'], 'content': result})
    return messages[-1]['content']


def main(model=None, question='What is 17 * 23?'):
    with LMDeployServer(path=model, max_new_tokens=64, top_k=1, temperature=0) as llm:
        print(f'server up at {llm.url}; question: {question}')
        run_agent(llm, question)
    print('server stopped')


if __name__ == '__main__':
    main(*sys.argv[1:3])
