"""The front end: CLI, launcher, OpenAI-compatible HTTP server, metrics and the offline `LLM`."""
