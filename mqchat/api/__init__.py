"""The HTTP API (FastAPI), served in the same process as the broker."""
