"""The model in a child server process: ``LMDeployServer`` starts ``lmwrap serve api_server`` on
127.0.0.1 and a free port, we ask it over HTTP (streaming, then a kept session of two turns whose
second turn sends only the new text), and closing the adapter stops the server.

    python examples/serve_and_ask.py [MODEL]        # default: SmolLM2-135M-Instruct
"""
import sys
import time

from lmwrap import LMDeployServer


def main(model=None):
    start = time.perf_counter()
    with LMDeployServer(path=model, meta_template='auto', max_new_tokens=32, top_k=1, temperature=0) as llm:
        print(f'server up at {llm.url} in {time.perf_counter() - start:.1f} s (pid {llm.process.pid})')
        print('stream_chat: ', end='', flush=True)
        shown = ''
        for status, text, _ in llm.stream_chat([dict(role='user', content='Name three rivers.')]):
            print(text[len(shown):], end='', flush=True)
            shown = text
        print()
        first = [dict(role='user', content='My name is Ada. Please remember it.')]
        reply = llm.chat(first, session_id=1, sequence_end=False)
        print(f'session turn 1: {reply!r}')
        second = [dict(role='user', content='What is my name?')]
        reply = llm.chat(second, session_id=1, sequence_start=False, sequence_end=True)
        print(f'session turn 2 (only this turn was sent): {reply!r}')
    print('server stopped')


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else None)
