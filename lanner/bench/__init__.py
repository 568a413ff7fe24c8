"""`lanner bench`: offline throughput, batch latency, an HTTP serving client, the roofline
floor of a run on its card, and the JSON/PNG report every bench writes."""
