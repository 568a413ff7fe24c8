"""The OpenAI-compatible HTTP server (`lanner serve`); needs the `serve` extra."""
