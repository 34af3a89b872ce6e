"""The inbox -> process -> outbox loop and the workflows that drive it."""
