"""The frontend: OpenAI-compatible HTTP API over the workers (FastAPI + uvicorn)."""
