"""The step planner of the prescore core (no vLLM import): one pass over the batch rows per step, on the host.

:func:`plan` classifies every row once (:func:`classify`):

- ``PREFILL`` (part of a prompt): vLLM's kernel attends it; with a budget, its chunk is scored
  (:class:`PrefillRow`, ``Plan.prefill``);
- ``DENSE`` (budget 0, or a decode row with more than one query token) and ``PAD`` (no query token or no
  request): vLLM's kernel;
- ``DECODE`` (a single-token decode row with a budget): one column of per-row fields in the persistent
  fixed-shape :class:`DecodeBuffers`, which the step (:mod:`.step`) runs: tail scoring, selection, sparse decode.

Two shapes of plan, FlashInfer style (one ``plan()`` per step, then one ``run()`` per layer):

- uniform (``Plan.rows is None``): a batch of single-token decode rows only (and ``fused_dense``, the CUDA
  backend): column i of the buffers is batch row i; dense-by-request and padding rows ride along as padding
  (scratch selection rows, no scoring, every block attended). This is what a FULL decode CUDA graph replays:
  the launches read the same buffer addresses every step. ``capture=True`` (a graph capture's dummy batch)
  makes every row padding whatever the request table holds.
- mixed: the ``DECODE`` rows fill a prefix of the same buffers (``rows``/``tokens`` map them to the batch);
  every other row goes to vLLM's kernel (``dense_rows``). Without ``fused_dense`` (CPU) a ``DECODE`` row whose
  context fits sink + window + budget is scored and selected by the step but attended by vLLM's kernel (bit-
  identical to the base backend); such rows sit after the ``num_attend`` rows the step attends.

The host counters (rows per method/mode) are added here, once per row and step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from prescore.kernels import METHODS, MODES

from . import compat, metrics
from .params import stateless
from .store import METHOD_NAMES, label

PAD, PREFILL, DENSE, DECODE = "pad", "prefill", "dense", "decode"


class PrefillRow(NamedTuple):
    row: int  # batch row
    start: int  # first token of the chunk
    end: int  # tokens in the cache after the chunk
    final: bool  # the chunk ends the prompt (fits the method's state)
    slot: int  # request slot (its fitted-state row)
    method: str
    mode: str
    tag: int


class DecodeBuffers:
    """Persistent per-row controls of the step's decode rows (CUDA graphs replay kernels that read these
    addresses): one int64 ``[F, max_rows]`` tensor (each field contiguous: the kernels index fields by row
    without strides) refilled by the planner each step; a step uses a prefix of its columns.

    ``method`` is the kernel method id (-1: no scoring: padding, unknown request or budget 0), ``col`` the
    method's column of the per-method summaries, ``srow`` the row's persistent state / selection-cache row
    (its request slot; padding rows get a private scratch row past the slots, so no two rows share one)."""

    FIELDS = ("slot", "method", "col", "srow", "budget", "sink", "window", "mode", "prior", "tag", "label",
              "sparse", "ctag", "clock")

    def __init__(self, max_rows: int, device):
        self.max_rows = max_rows
        self.buf = torch.zeros(len(self.FIELDS), max_rows, dtype=torch.int64, device=device)
        self.rows = 0
        self.clock = 0  # the step clock: one tick per fill (per step); every row of a step gets the same value

    def field(self, name: str, n: int) -> torch.Tensor:
        return self.buf[self.FIELDS.index(name), :n]

    def fill(self, rows: list[tuple], clock: int | None = None) -> None:
        """``rows``: one tuple per row of every field but ``clock``, the step clock every row of the step gets
        (``clock``, default the next tick). With ``reselect_clock`` "step" query-aware rows re-select when it is a
        multiple of ``reselect_every`` (all rows together; the steps between do no bound or selection work);
        with "request" (``Plan.step_clock`` False) the step ignores it and the rows' lengths decide."""
        n = len(rows)
        self.clock = self.clock + 1 if clock is None else clock
        rows = [(*r, self.clock) for r in rows]
        if n > self.max_rows:
            raise RuntimeError(f"prescore: {n} decode rows in one step, the buffers hold {self.max_rows}")
        if n:
            # pageable source: the copy is staged before copy_ returns, so it is free to reuse at once (a pinned
            # buffer refilled next step could race the in-flight DMA)
            self.buf[:, :n].copy_(torch.tensor(rows, dtype=torch.int64).view(n, len(self.FIELDS)).T,
                                  non_blocking=True)
        self.rows = n


_SPARSE = DecodeBuffers.FIELDS.index("sparse")


@dataclass
class Plan:
    """One step's plan (see module doc). The step runs ``bufs`` columns ``[:num_rows]``."""

    bufs: DecodeBuffers
    num_rows: int
    num_attend: int  # the step writes the output of the first num_attend rows (the rest: vLLM's kernel)
    rows: torch.Tensor | None  # [num_rows] batch row of each column; None: uniform (column i = batch row i)
    tokens: torch.Tensor | None  # [num_rows] query token of each column
    prefill: list  # PrefillRow
    dense_rows: list  # batch rows vLLM's kernel attends (host)
    max_selected: int  # selection capacity in blocks
    quest_beta: float
    every: int  # reselect_every
    debug: bool = False
    step_clock: bool = False  # reselect_clock "step": re-select on DecodeBuffers' clock, else on the row's length
    async_select: bool = False  # reselect_async: re-select beside the decode, adopt on the next step
    dense_tokens: torch.Tensor | None = None  # set by the platform when vLLM's kernel attends a subset
    dense_md: object | None = None

    @property
    def uniform(self) -> bool:
        return self.rows is None


def _pad_fields(slot: int, scratch_row: int) -> tuple:
    return (max(slot, 0), -1, 0, scratch_row, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def summary_only(table, slot: int, p, block_size: int) -> bool:
    """A request with a stateful method (k-means, leverage) that can never go sparse: its prompt plus
    ``max_tokens`` fit sink + window + budget. Its prompt is summarised (block min/max, key-norm scores) under tag 0
    (no owner: prefix-cache sharers rank such blocks by their query-aware key, prior rows attend them) and its
    state is not fitted: the fit is most of a prompt's scoring time, and short requests (chat turns, vLLM's own
    warm-up of up to max_num_seqs 2-token requests) never use it. Tables without ``max_len`` (the quality harness)
    score every prompt."""
    ml = getattr(table, "max_len", None)
    if ml is None or stateless(p.method):
        return False
    budget, sink, window, _ = p.blocks(block_size)
    return -(-ml[slot] // block_size) <= sink + window + budget


def classify(qlen: int, ctx: int, slot: int, table, block_size: int) -> tuple[str, object, tuple | None]:
    """(kind, params, DecodeBuffers fields) of one batch row; counts the row in the host counters.
    ``fields`` only for DECODE rows (their ``sparse`` field: the context exceeds sink + window + budget)."""
    p = table.params[slot] if slot >= 0 else None
    if qlen <= 0 or p is None:
        return PAD, p, None
    if ctx - qlen < table.prefill_len[slot]:  # (part of) a prefill
        if p.budget > 0:
            metrics.add(p.method, p.mode, prefill_rows=1, prefill_tokens=qlen)
        return PREFILL, p, None
    if p.budget == 0 or qlen != 1:  # dense by request (or a multi-token decode: not sparse-capable)
        metrics.add(p.method, p.mode, decode_rows_dense=1)
        return DENSE, p, None
    budget, sink, window, prior = p.blocks(block_size)
    sparse = -(-ctx // block_size) > sink + window + budget
    metrics.add(p.method, p.mode, **{"decode_rows_sparse" if sparse else "decode_rows_dense": 1})
    tag = 0 if summary_only(table, slot, p, block_size) else table.tag[slot]  # (its tail blocks: no owner either)
    return DECODE, p, (slot, METHODS[p.method].method_id, METHOD_NAMES.index(p.method), slot, budget, sink, window,
                       MODES[p.mode], prior, tag, label(p), int(sparse), table.serial[slot])


def plan(cm, block_size: int, bufs: DecodeBuffers, table, *, max_selected: int, fused_dense: bool,
         capture: bool = False) -> Plan:
    """Plan one step from vLLM's ``CommonAttentionMetadata`` ``cm`` and the request ``table``
    (:class:`~prescore.backend.requests.RequestTable`); fills ``bufs``. See the module doc."""
    n = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: n + 1].tolist()
    qlens = [qsl[i + 1] - qsl[i] for i in range(n)]
    d = table.defaults
    consts = dict(max_selected=max_selected, quest_beta=d.quest_beta, every=d.reselect_every, debug=d.debug,
                  step_clock=d.reselect_clock == "step", async_select=d.reselect_async)
    scratch = max(table.capacity, 1)
    fits = n <= bufs.max_rows and all(q <= 1 for q in qlens)
    if capture and fused_dense and fits:
        # a CUDA graph capture's dummy batch: every row is padding (the sampler's warmup requests may still sit
        # in the table), so the graph always records the fused decode path
        bufs.fill([_pad_fields(0, scratch + i) for i in range(n)])
        return Plan(bufs, n, n, None, None, [], [], **consts)
    seq = compat.host_seq_lens(cm).tolist()
    slots = table.live(table.slots(n, compat.req_slots(cm)), qlens, seq)
    rows = [(i, slots[i], *classify(qlens[i], int(seq[i]), slots[i], table, block_size)) for i in range(n)]
    prefill = []
    for i, s, kind, p, _ in rows:
        if kind == PREFILL and p.budget > 0:
            short = summary_only(table, s, p, block_size)
            prefill.append(PrefillRow(i, int(seq[i]) - qlens[i], int(seq[i]),
                                      int(seq[i]) >= table.prefill_len[s] and not short, s, p.method, p.mode,
                                      0 if short else table.tag[s]))
    # multi-token decode rows (speculative decoding) run dense but summarise the blocks they write, so no block
    # of a context keeps a previous occupant's summaries; stateful methods have no key scores there (the fitted
    # state is not applied to a chunk): tag 0, no owner (query-aware rows rank them, prior rows attend them)
    prefill += [PrefillRow(i, int(seq[i]) - qlens[i], int(seq[i]), False, s, p.method, p.mode,
                           table.tag[s] if stateless(p.method) else 0)
                for i, s, kind, p, _ in rows if kind == DENSE and qlens[i] > 1 and p.budget > 0]
    if fused_dense and fits and all(kind != PREFILL for _, _, kind, _, _ in rows):
        bufs.fill([f if kind == DECODE else _pad_fields(s, scratch + i) for i, s, kind, _, f in rows])
        return Plan(bufs, n, n, None, None, [], [], **consts)
    attend = [(i, f) for i, _, kind, _, f in rows if kind == DECODE and (fused_dense or f[_SPARSE])]
    scored = [(i, f) for i, _, kind, _, f in rows if kind == DECODE and not (fused_dense or f[_SPARSE])]
    dense_rows = sorted(set(range(n)) - {i for i, _ in attend})
    dec = attend + scored
    bufs.fill([f for _, f in dec])
    dev = bufs.buf.device
    return Plan(bufs, len(dec), len(attend), torch.tensor([i for i, _ in dec], dtype=torch.long, device=dev),
                torch.tensor([qsl[i] for i, _ in dec], dtype=torch.long, device=dev), prefill, dense_rows, **consts)


__all__ = ["DECODE", "DENSE", "DecodeBuffers", "PAD", "PREFILL", "Plan", "PrefillRow", "classify", "plan"]
