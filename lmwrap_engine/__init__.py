"""lmwrap's inference engine, with lmdeploy's public API.

    from lmwrap_engine import pipeline, GenerationConfig
    pipe = pipeline()   # default model: SmolLM2-135M-Instruct
    print(pipe("What is the capital of France?", gen_config=GenerationConfig(max_new_tokens=32)).text)
"""
from .async_engine import AsyncEngine
from .chat_template import ChatTemplateConfig
from .config import GenerationConfig, GenOut, PytorchEngineConfig, Response, TurbomindEngineConfig
from .pipeline import Pipeline, Session, pipeline

__all__ = ["pipeline", "Pipeline", "Session", "AsyncEngine", "GenerationConfig", "GenOut", "PytorchEngineConfig",
           "TurbomindEngineConfig", "ChatTemplateConfig", "Response"]
