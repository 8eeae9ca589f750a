"""trainsvc: the HTTP API. Never imports torch; training lives in the worker package."""
