"""What the API and the worker share: settings, database, tables, the spec contract, the job
lifecycle and the outbox. Imports neither FastAPI nor the worker."""
