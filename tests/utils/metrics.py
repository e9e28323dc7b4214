"""Reading Prometheus exposition text (the gateway's and vLLM's /metrics) in tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric_total(text: str, sample: str, **labels: str) -> float:
    """Sum of the samples named `sample` whose labels include `labels`; 0 when there is none yet."""
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == sample and labels.items() <= s.labels.items())
