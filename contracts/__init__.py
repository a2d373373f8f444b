"""Event contracts shared between services: envelope, topic names and payload models. No logic."""
