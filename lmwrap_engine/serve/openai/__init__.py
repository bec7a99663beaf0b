"""lmdeploy's OpenAI-compatible api_server over lmwrap's AsyncEngine (``lmwrap serve api_server``).

Import ``lmwrap_engine.serve.openai.api_server`` for ``create_app`` and ``serve``; this package
itself imports nothing heavy.
"""
