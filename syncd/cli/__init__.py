"""The commands: thin layers over the engine, store and core."""
