"""prescore's Prometheus metrics, served by vLLM's own ``/metrics`` (same registry, vLLM naming: ``prescore:``
namespace like vLLM's ``vllm:``, snake_case, unit suffixes, ``_total`` counters, a ``model_name`` label).

- ``prescore:requests_total{model_name, budget_bucket, method, mode}``: generation requests served (every
  generation route; counted when a response with HTTP 200 ends), by the budget applied (``le_256``,
  ``le_512``, ... ``le_16384``, ``gt_16384``) or ``dense`` when every decode step ran dense: budget 0, or the
  request's context (prompt + completion tokens from its usage; without usage, the model's max length) fits in
  sink + window + budget.
- ``prescore:rejected_requests_total{model_name, field}``: requests answered 400 by the prescore layer, by the
  field at fault (``key_budget``, ``method``, ``mode``, ``sink``, ``window``, ``prescore``, ``vllm_xargs``, ``other``).
- the backend's per-worker counters (``prescore.backend.metrics``: files under ``PRESCORE_METRICS_DIR``,
  summed over processes), each ``prescore:<counter>_total{model_name, method, mode}``:
  ``decode_rows_sparse`` / ``decode_rows_dense`` (decode steps, one row per request and step),
  ``prefill_rows`` / ``prefill_tokens``, ``selected_tokens`` / ``context_tokens`` (over sparse rows),
  ``selected_blocks`` / ``context_blocks``, and any counter the backend adds later (e.g. ``scoring_seconds``).
"""

from __future__ import annotations

import os
import threading

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily

NAMESPACE = "prescore:"
DOCS = {
    "decode_rows_sparse": "Decode steps (one row per request and step) that ran prescore's sparse attention.",
    "decode_rows_dense": "Decode steps (one row per request and step) that ran dense attention.",
    "prefill_rows": "Prefill chunks whose keys were pre-scored.",
    "prefill_tokens": "Prompt tokens in pre-scored prefill chunks.",
    "selected_tokens": "Tokens attended by sparse decode rows (summed over layers, mean over KV heads).",
    "context_tokens": "Context tokens of sparse decode rows (summed over layers, mean over KV heads).",
    "selected_blocks": "KV blocks attended by sparse decode rows (summed over layers, mean over KV heads).",
    "context_blocks": "Context KV blocks of sparse decode rows (summed over layers, mean over KV heads).",
    "scoring_seconds": "Time spent pre-scoring keys.",
}

_lock = threading.Lock()
_requests: Counter | None = None
_rejected: Counter | None = None
FIELDS = ("key_budget", "method", "mode", "sink", "window", "prescore", "vllm_xargs")
_collector = None


def requests_counter() -> Counter:
    global _requests
    with _lock:
        if _requests is None:
            _requests = Counter(NAMESPACE + "requests", "Generation requests served, by applied key budget "
                                "(dense: every decode step ran dense).",
                                ["model_name", "budget_bucket", "method", "mode"])
        return _requests


def rejected_counter() -> Counter:
    global _rejected
    with _lock:
        if _rejected is None:
            _rejected = Counter(NAMESPACE + "rejected_requests", "Requests refused (HTTP 400) by the prescore layer, "
                                "by the field at fault.", ["model_name", "field"])
        return _rejected


def field_label(param: str | None) -> str:
    """A bounded label for an error's param: 'prescore.mode' -> mode, 'vllm_xargs.prescore_budget' -> budget."""
    last = (param or "").rsplit(".", 1)[-1].removeprefix("prescore_")
    last = {"budget": "key_budget", "": "prescore" if param else ""}.get(last, last)
    return last if last in FIELDS else ("vllm_xargs" if (param or "").startswith("vllm_xargs") else "other")


class EngineCounters:
    """Collector for the backend's counters, read from the worker files at scrape time."""

    def __init__(self, directory: str, model_name: str):
        self.directory, self.model_name = directory, model_name

    def collect(self):
        from prescore.backend.metrics import COUNTERS, read_dir

        try:
            snap = read_dir(self.directory) if os.path.isdir(self.directory) else {"counters": []}
        except OSError:
            snap = {"counters": []}
        rows = snap.get("counters", [])
        names = list(COUNTERS) + sorted({k for r in rows for k in r if k not in ("method", "mode")} - set(COUNTERS))
        for name in names:
            fam = CounterMetricFamily(NAMESPACE + name, DOCS.get(name, f"prescore backend counter {name}."),
                                      labels=["model_name", "method", "mode"])
            for r in rows:
                if name in r:
                    fam.add_metric([self.model_name, r["method"], r["mode"]], float(r[name]))
            yield fam


def install_engine_collector(model_name: str) -> None:
    """Register the backend counters in the registry vLLM's /metrics serves (once per process)."""
    global _collector
    directory = os.environ.get("PRESCORE_METRICS_DIR")
    with _lock:
        if _collector is not None or not directory:
            return
        _collector = EngineCounters(directory, model_name)
        REGISTRY.register(_collector)
