"""arctl_gateway: an asyncio OpenAI-compatible gateway in front of SGLang (or any OpenAI-compatible)
workers, with Prometheus metrics. Imports no torch, transformers or sglang."""

__version__ = "0.1.0"
