"""`lanner router`: the load-balancing front over lanner (or any OpenAI-compatible) replicas."""
