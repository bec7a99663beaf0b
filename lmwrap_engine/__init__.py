"""lmwrap's inference engine, with lmdeploy's public API.

    from lmwrap_engine import pipeline, GenerationConfig
    pipe = pipeline()   # default model: SmolLM2-135M-Instruct
    print(pipe("What is the capital of France?", gen_config=GenerationConfig(max_new_tokens=32)).text)
"""


def client(api_server_url: str = "http://127.0.0.1:23333", api_key=None, **kwargs):
    """lmdeploy's ``client``: an ``APIClient`` of the api_server at ``api_server_url`` (needs no torch)."""
    from .serve.api_client import APIClient
    return APIClient(api_server_url, api_key, **kwargs)


_ENGINE_NAMES = ("pipeline", "Pipeline", "Session", "AsyncEngine", "GenerationConfig", "GenOut",
                 "PytorchEngineConfig", "TurbomindEngineConfig", "ChatTemplateConfig", "Response")

try:
    import torch  # noqa: F401  (the engine needs it; a thin client install has only client / serve.api_client)
except ImportError:
    __all__ = ["client"]

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in _ENGINE_NAMES:  # e.g. a submodule: the import system loads it (and says what it lacks)
            raise AttributeError(name)
        raise ImportError(f"lmwrap_engine.{name} needs the engine's dependencies (torch is not installed): "
                          "pip install 'lmwrap[engine]'")
else:
    from .async_engine import AsyncEngine
    from .chat_template import ChatTemplateConfig
    from .config import GenerationConfig, GenOut, PytorchEngineConfig, Response, TurbomindEngineConfig
    from .pipeline import Pipeline, Session, pipeline

    __all__ = [*_ENGINE_NAMES, "client"]
