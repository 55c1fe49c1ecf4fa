"""The SGLang-compatible HTTP server: `app` (the FastAPI routes), `worker` (the engine thread), `protocol` (the wire
format). The server meets the engine through parityrt.engine.api only. Built by parityrt.runtime.build_state and
started by parityrt.serve (`python -m parityrt.serve`)."""
