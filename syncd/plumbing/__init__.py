"""Settings, HTTP, logging, errors registry, tokens, metrics: what every layer uses."""
