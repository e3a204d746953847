"""What one request may ask of the server: each limit is a 400 (413 for the body) naming the field
and the number, checked before anything is allocated for the request. The context length is the
model's (``--max-model-len``): see ``generation.fit_context``."""

MAX_BODY_BYTES = 64 * 1024 * 1024
"""The default of --max-request-body-bytes: Litestar's own (10 MB) is below a long context sent
as token ids in JSON; a bound at all keeps one request from taking an API process's memory."""
MAX_N = 128
MAX_LOGPROBS = 20
# Each stop string is matched against every new piece of a sample's text, each bias and stop
# token applied to every row the request samples: bounds on the per-step cost of one request.
# vLLM sets none and OpenAI allows 4 stop strings; these leave room for any real use.
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 512
MAX_LOGIT_BIAS = 1024
MAX_STOP_TOKEN_IDS = 1024
