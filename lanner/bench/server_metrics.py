"""A server's Prometheus /metrics as a flat dict, for benches and tests that report what
the server counted (prefix-cache hits, requests per replica, routing decisions)."""

from __future__ import annotations


def scrape_metrics(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Every sample of `url`/metrics as 'name{labels}' -> value, labels sorted and
    model_name left out: 'lanner:request_success_total{finished_reason=stop}'."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout_s).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(
                f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name"
            )
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def metric_total(samples: dict[str, float], prefix: str) -> float:
    """The sum of every sample whose 'name{labels}' starts with `prefix`."""
    return sum(value for name, value in samples.items() if name.startswith(prefix))
