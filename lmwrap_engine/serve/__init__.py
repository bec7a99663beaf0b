"""Network servers over the engine: ``serve.openai`` (lmdeploy's OpenAI-compatible api_server)."""
