"""The ASGI app: webhooks, health, metrics."""
