"""Our engine inside a real Triton Inference Server (``lmwrap serve triton``); see ``protocol.py``."""
