"""Observability: proof that the sparse path ran, per scoring method and selection mode.

Counters (monotonic), each labelled ``{method, mode}``:

- ``decode_rows_sparse`` / ``decode_rows_dense``  decode rows per step (a row = one request's token)
- ``prefill_rows`` / ``prefill_tokens``           prefill chunks scored / their tokens
- ``selected_tokens`` / ``context_tokens``        over sparse rows, summed over layers, averaged over KV
                                                  heads: attended tokens vs context tokens
- ``selected_blocks`` / ``context_blocks``        the same in KV blocks

In-process: :func:`snapshot`. Across processes (vLLM workers are separate processes): set
``PRESCORE_METRICS_DIR``; every worker rewrites ``<dir>/prescore-<pid>.json`` when it builds a step and the
last write is ``PRESCORE_METRICS_INTERVAL`` seconds (default 1) old, and at exit; with CPU counters also from
a daemon thread every interval (on GPUs the file can lag by one step while the server is idle). Files of
dead processes stay: use a fresh directory per server run. :func:`read_dir` sums those files and
:func:`prometheus_text` renders any snapshot in the Prometheus text format (``prescore_<counter>_total``).
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections import defaultdict

import torch

ROW_COUNTERS = ("decode_rows_sparse", "decode_rows_dense", "prefill_rows", "prefill_tokens")
LAYER_COUNTERS = ("selected_tokens", "context_tokens", "selected_blocks", "context_blocks")
TIME_COUNTERS = ("scoring_seconds",)  # prefill scoring time, summed over layers (GPU: device time by CUDA events)
COUNTERS = ROW_COUNTERS + LAYER_COUNTERS + TIME_COUNTERS
ENV_DIR = "PRESCORE_METRICS_DIR"
ENV_INTERVAL = "PRESCORE_METRICS_INTERVAL"

_lock = threading.Lock()
_host: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0.0))
_device: list[tuple[torch.Tensor, list[tuple[str, str]]]] = []  # (acc [K, 4], labels per row)
_last_dump = 0.0


def add(method: str, mode: str, **counts: float) -> None:
    """Add host-side counts (row counters)."""
    with _lock:
        d = _host[(method, mode)]
        for k, v in counts.items():
            d[k] += float(v)


_pending: list = []  # (start event, end event, (method, mode)) of GPU scoring not yet read


def add_scoring_time(method: str, mode: str, seconds: float | None = None, events=None) -> None:
    """Prefill scoring time: host seconds (CPU, synchronous) or a (start, end) pair of recorded CUDA events,
    read once they complete (never waits)."""
    if events is None:
        add(method, mode, scoring_seconds=seconds or 0.0)
        return
    with _lock:
        _pending.append((events[0], events[1], (method, mode)))
        big = len(_pending) > 512
    if big:
        _resolve()


def _resolve() -> None:
    with _lock:
        todo = list(_pending)
        _pending.clear()
    keep = []
    for start, end, lab in todo:
        if end.query():
            add(*lab, scoring_seconds=start.elapsed_time(end) / 1e3)
        else:
            keep.append((start, end, lab))
    with _lock:
        _pending[:0] = keep


def device_accumulator(labels: list[tuple[str, str]], device) -> torch.Tensor:
    """A ``[len(labels), 4]`` float64 tensor the caller adds LAYER_COUNTERS into on its device (no host
    sync, CUDA-graph safe); read at snapshot time."""
    acc = torch.zeros(len(labels), len(LAYER_COUNTERS), dtype=torch.float64, device=device)
    with _lock:
        _device.append((acc, list(labels)))
    return acc


def snapshot() -> dict:
    """{"counters": [{"method", "mode", <counter>: value, ...}], "pid": ...} for this process."""
    if _pending:
        _resolve()
    with _lock:
        merged = {k: dict(v) for k, v in _host.items()}
        device = list(_device)
    for acc, labels in device:
        vals = acc.detach().cpu().tolist()
        for lab, row in zip(labels, vals):
            if any(row):
                d = merged.setdefault(lab, dict.fromkeys(COUNTERS, 0.0))
                for name, v in zip(LAYER_COUNTERS, row):
                    d[name] += v
    rows = [{"method": m, "mode": md, **c} for (m, md), c in sorted(merged.items()) if any(c.values())]
    return {"pid": os.getpid(), "time": time.time(), "counters": rows}


def totals(snap: dict, **labels) -> dict[str, float]:
    """Sum a snapshot's counters over the rows matching ``labels`` (e.g. method="kmeans")."""
    out = dict.fromkeys(COUNTERS, 0.0)
    for row in snap["counters"]:
        if all(row.get(k) == v for k, v in labels.items()):
            for c in COUNTERS:
                out[c] += row.get(c, 0.0)
    return out


def dump(directory: str | None = None) -> str | None:
    directory = directory or os.environ.get(ENV_DIR)
    if not directory:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"prescore-{os.getpid()}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(snapshot(), f)
    os.replace(tmp, path)
    return path


_thread: threading.Thread | None = None


def _all_on_cpu() -> bool:
    with _lock:
        return all(acc.device.type == "cpu" for acc, _ in _device)


def _dump_loop(interval: float) -> None:
    while True:
        time.sleep(interval)
        if _all_on_cpu():  # reading GPU counters from a side thread could disturb CUDA graph capture
            try:
                dump()
            except OSError:
                pass


def maybe_dump() -> None:
    """Called once per step by the metadata builder: rewrite this process's file when it is due. With CPU
    counters a daemon thread also rewrites it every interval, so the file is current while idle."""
    global _last_dump, _thread
    if not os.environ.get(ENV_DIR):
        return
    if _thread is None:
        _thread = threading.Thread(target=_dump_loop, args=(float(os.environ.get(ENV_INTERVAL, "1")),),
                                   name="prescore-metrics", daemon=True)
        _thread.start()
    now = time.monotonic()
    if now - _last_dump >= float(os.environ.get(ENV_INTERVAL, "1")):
        _last_dump = now
        try:
            dump()
        except OSError:
            pass


def read_dir(directory: str) -> dict:
    """Sum of every process's dumped counters under ``directory``."""
    merged: dict[tuple[str, str], dict[str, float]] = {}
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("prescore-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                snap = json.load(f)
        except (OSError, ValueError):
            continue
        for row in snap.get("counters", []):
            d = merged.setdefault((row["method"], row["mode"]), dict.fromkeys(COUNTERS, 0.0))
            for c in COUNTERS:
                d[c] += row.get(c, 0.0)
    return {"counters": [{"method": m, "mode": md, **c} for (m, md), c in sorted(merged.items())]}


def prometheus_text(snap: dict) -> str:
    lines = []
    for c in COUNTERS:
        lines.append(f"# TYPE prescore_{c}_total counter")
        for row in snap["counters"]:
            lines.append(f'prescore_{c}_total{{method="{row["method"]}",mode="{row["mode"]}"}} {row.get(c, 0.0)}')
    return "\n".join(lines) + "\n"


def reset() -> None:
    """Zero every counter of this process (tests)."""
    with _lock:
        _host.clear()
        with torch.inference_mode():  # the accumulators are created inside vLLM's inference mode
            for acc, _ in _device:
                acc.zero_()


atexit.register(lambda: os.environ.get(ENV_DIR) and dump())
