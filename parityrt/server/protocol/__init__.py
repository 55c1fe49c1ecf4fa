"""SGLang 0.5.23's wire format (../shared/reference/sglang_api.md), between HTTP and the engine's typed messages:
`generate` (a /generate body -> GenerateRequests, SGLang's error texts), `response` (RequestOutput -> SGLang's
response object), `schemas` (the route bodies FastAPI parses, SGLang's ErrorResponse) and `openai` (the OpenAI
routes over /generate). Offline tools parse and answer through the same modules (parityrt/generation.py)."""
