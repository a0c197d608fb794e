"""arctl_serve: the embedded CPU engine, an OpenAI-compatible HTTP server over a model loaded by
arctl (a QuantizedCheckpoint, an exported folder, a float folder or a GGUF file). It speaks the
subset of SGLang's HTTP surface the gateway uses (``/v1/*``, ``/health``, ``/get_model_info``,
``/abort_request``, ``/metrics`` with ``sglang:*`` names), so the gateway treats it as an SGLang
worker. It runs in its own process: the gateway never imports it."""
