"""One agent, three places for its model: only the llm config's ``type`` (and where-to-find-it keys) change.

    python examples/config_swap.py LMDeployPipeline                  # model in this process
    python examples/config_swap.py LMDeployServer                    # we start `lmwrap serve api_server`
    lmwrap serve api_server &                                        # someone else's server ...
    python examples/config_swap.py LMDeployClient --url http://127.0.0.1:23333   # ... used over HTTP
    lmwrap serve triton &                                            # a Triton Inference Server ...
    python examples/config_swap.py TritonClient --tritonserver-addr 127.0.0.1:33337   # ... over gRPC

The same dict works with lagent 0.5's ``create_object`` when ``type`` is a dotted path
(``'lmwrap.LMDeployPipeline'``) or the class itself.
"""
import argparse
import os
import sys

from lagent.actions import ActionExecutor, PythonInterpreter
from lagent.agents import ReAct

from lmwrap import build_llm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from react_agent import FEW_SHOT, PYTHON_TOOL  # noqa: E402

# What every adapter shares: how prompts are built and how to generate.
COMMON = dict(meta_template='smollm2', max_new_tokens=256, top_k=1, temperature=0, stop_words=['<|im_end|>'])


def llm_config(kind: str, args) -> dict:
    where = {
        'LMDeployPipeline': dict(path=args.model),
        'LMDeployServer': dict(path=args.model, server_name='127.0.0.1', server_port=args.port),
        'LMDeployClient': dict(url=args.url, model_name=args.model_name),
        'TritonClient': dict(tritonserver_addr=args.tritonserver_addr, model_name=args.model_name or '',
                             session_len=4096),
    }[kind]
    return dict(type=kind, **where, **COMMON)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('type', choices=['LMDeployPipeline', 'LMDeployServer', 'LMDeployClient', 'TritonClient'])
    parser.add_argument('--model', default=None, help='model for the pipeline/server (default: SmolLM2-135M)')
    parser.add_argument('--port', type=int, default=None, help='port for LMDeployServer (default: a free one)')
    parser.add_argument('--url', default='http://127.0.0.1:23333')
    parser.add_argument('--tritonserver-addr', default='127.0.0.1:33337', help="TritonClient's gRPC address")
    parser.add_argument('--model-name', default=None, help="the served model's name (default: the one it serves)")
    parser.add_argument('--question', default='Compute 17 * 23.')
    args = parser.parse_args()

    config = llm_config(args.type, args)
    print('llm config:', config)
    llm = build_llm(config)
    agent = ReAct(llm=llm, action_executor=ActionExecutor(actions=[PythonInterpreter(description=PYTHON_TOOL)]))
    result = agent.chat(FEW_SHOT + [dict(role='user', content=args.question)])
    print('tools used:', [action.type for action in result.actions])
    print('answer:', result.response.strip())

    print('stream_chat, the same on every adapter:')
    for status, text, _ in llm.stream_chat([dict(role='user', content='Say hello in five words.')]):
        print(f'  {status.name:<10} {text!r}')
    close = getattr(llm, 'close', None)
    if close:
        close()


if __name__ == '__main__':
    main()
