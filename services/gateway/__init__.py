"""Gateway: the public API. Authenticates users, enforces Idempotency-Key and proxies to the services."""
