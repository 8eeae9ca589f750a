"""The HTTP layer: create_app(), one error handler, limits, and one package per domain."""
