"""Reads an OpenMetrics exposition on stdin with the Prometheus project's own
parser (prometheus_client) and prints every sample as JSON lines:
{"name": ..., "labels": {...}, "value": ...}. A malformed exposition makes
the parser raise, and this script exit non-zero."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        print(json.dumps({"name": sample.name, "labels": sample.labels, "value": sample.value}))
