"""Local stack: infrastructure processes (infra), service registry (services), launcher (run), test plugin."""
