"""Harvest (time tracking, API v2): the connector, its payload models and its emulator."""
