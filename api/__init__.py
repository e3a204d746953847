"""runtime.api: the OpenAI-compatible HTTP server (Litestar on uvicorn)."""
