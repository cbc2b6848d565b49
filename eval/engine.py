"""Decode-mode sparse attention inside a transformers model, through the backend's own decode step.

:class:`SparseEvalEngine` registers an attention function with transformers' ``AttentionInterface`` (name
``prescore_eval``); the model keeps its own projections, RoPE, norms and MLPs, only the attention call is ours.
Each evaluated row (trial x config) is a request slot of a request table as the backend's planner reads it (the
config turned into :class:`PrescoreParams` by :meth:`SparseEvalEngine.params`); each layer keeps a backend
:class:`LayerStore` over a paged KV cache laid out like vLLM's (``[num_blocks, Hkv, block_size, 2*D]``, K in
``[..., :D]``, V in ``[..., D:]``, the block summaries in the page padding):

- **prefill** (``Engine.run`` feeds ``prefix_ids [T, N]``, ``N % block_size == 0``): dense causal attention
  (``torch.nn.functional.scaled_dot_product_attention``) plays vLLM's kernel; the K/V go into the paged cache and
  the backend's prefill scoring (``step.score_prefill_rows``, one ``PrefillRow`` per trial and method, the fitted
  state copied to the trial's other rows of that method) fits and scores every method a row uses.
- **decode** (one token per row per step): the new K/V is written to the row's own tail block (vLLM's job), then
  every step is planned by the backend's planner (``plan.plan``: ``classify`` per row, the persistent
  ``DecodeBuffers``, a uniform plan: dense rows ride along as padding) and each layer runs the backend's step
  (``step.run`` -> ``step.decode``: tail scoring, selection into the per-slot selection cache with the reuse
  schedule, sparse attention) with the backend's op set: :data:`~prescore.backend.step.TRITON` on CUDA, the
  torch ops on CPU (:class:`EvalTorchOps`: ``TorchOps`` whose attention is vectorised over the rows of a trial,
  which share the prefix blocks like vLLM's prefix cache). One plan per (quest_beta, reselect_every) group of
  configs (these are server-wide settings, so a sweep runs one "server" per value).

Budget convention: a config's ``budget`` is the TOTAL number of key tokens attended per KV head (sink + window +
selected, in whole blocks): the row's ``prescore_budget`` is ``budget - sink - window`` (sink and window rounded up
to whole blocks, the total rounded down). A row whose context fits sink + window + budget is dense (the selection
says so) and runs the same attention as the dense rows: at budget >= context the result equals dense exactly.

``sink+window`` (``static``; StreamingLLM, not a mode of the server): a prior-mode row whose window takes the whole
budget after the sink (budget 1 block); its selection (:meth:`EvalTorchOps.select`) is the shared ``select_blocks``
with a capacity of exactly sink + window blocks and without the step's overflow -> dense rule, so only the forced
blocks fit (the server has no capacity per row; with its rule such a row would turn dense). Tail scoring and
attention are the step's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from prescore.backend import step
from prescore.backend.params import PrescoreParams, stateless
from prescore.backend.plan import DecodeBuffers, PrefillRow, plan as plan_step
from prescore.backend.store import METHOD_NAMES, LayerStore, extra_page_bytes, state_floats
from prescore.kernels import METHODS, select_blocks
from prescore.kernels.decode import sparse_decode_ref

ATTN_NAME = "prescore_eval"
PRIOR_METHODS = tuple(METHODS)  # the scoring-method registry, in registration order

_ACTIVE: "SparseEvalEngine | None" = None


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if _ACTIVE is None:
        raise RuntimeError("prescore_eval attention called outside SparseEvalEngine.run")
    return _ACTIVE.attend(module, query, key, value, scaling), None


def register() -> None:
    """Register ``prescore_eval`` with transformers (idempotent). No mask function is registered, so
    transformers builds no mask for it (causality is handled here)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _attention)


def config_label(method: str, mode: str, variant: str | None = None) -> str:
    """How tables name a config (also of result rows: ``method``, ``mode``, ``variant``)."""
    if mode in ("dense", "static"):
        return "dense" if mode == "dense" else "sink+window"
    base = "quest" if mode == "quest" else f"{mode}:{method}"
    return base if variant is None else f"{base}({variant})"


@dataclass(frozen=True)
class Config:
    """One evaluated setting. ``method``: dense | sink_window | quest | keynorm | leverage | kmeans;
    ``mode``: dense | static | prior | quest | hybrid; ``budget``: total tokens per KV head (None = dense)."""

    method: str
    mode: str
    budget: int | None
    beta: float | None = None  # quest_beta of this config (None: the engine's); a sweep variant when set
    every: int | None = None  # reselect_every of this config (None: the engine's); a sweep variant when set

    @property
    def variant(self) -> str | None:
        v = [f"beta={self.beta:g}"] if self.beta is not None else []
        v += [f"every={self.every}"] if self.every is not None else []
        return ",".join(v) or None

    @property
    def label(self) -> str:
        return config_label(self.method, self.mode, self.variant)

    @property
    def summ_method(self) -> str:
        """The row's scoring method (stateless keynorm for the modes that ignore the prior)."""
        return self.method if self.method in PRIOR_METHODS else "keynorm"


def make_configs(budgets, methods=PRIOR_METHODS, modes=("static", "prior", "quest", "hybrid"),
                 quest_betas=(), reselect_everys=()) -> list[Config]:
    """Dense, then per budget every mode (prior/hybrid once per method); ``quest_betas``: extra quest rows at
    those ``quest_beta`` values (a sweep; the plain quest row runs at the engine's); ``reselect_everys``: extra
    quest and hybrid rows at those re-selection intervals (hybrid with the server's default method when it is
    among ``methods``, else the first)."""
    out = [Config("dense", "dense", None)]
    for b in budgets:
        if "static" in modes:
            out.append(Config("sink_window", "static", int(b)))
        if "prior" in modes:
            out += [Config(m, "prior", int(b)) for m in methods]
        if "quest" in modes:
            out.append(Config("quest", "quest", int(b)))
        out += [Config("quest", "quest", int(b), float(x)) for x in quest_betas]
        if "hybrid" in modes:
            out += [Config(m, "hybrid", int(b)) for m in methods]
        hm = PrescoreParams.method if PrescoreParams.method in methods else methods[0]
        for e in reselect_everys:
            out += [Config("quest", "quest", int(b), every=int(e)), Config(hm, "hybrid", int(b), every=int(e))]
    return out


# ---------------------------------------------------------------------------------------------------- op sets
class _SinkWindowRows:
    """Mixin over a step op set: rows flagged in ``static`` (by selection-cache row) are the sink+window baseline;
    their selection is ``select_blocks`` with a capacity of exactly sink + window blocks (see the module doc)."""

    static: torch.Tensor | None = None  # bool [selection-cache rows]

    def select(self, store, q, bt, sl, f, cache, max_selected: int, block_size: int, beta: float, every: int,
               clocks, pending=None, due_only: bool = False) -> None:
        st = None if self.static is None else self.static[f("srow").long()]
        if st is None or not bool(st.any()):
            return super().select(store, q, bt, sl, f, cache, max_selected, block_size, beta, every, clocks,
                                  pending=pending, due_only=due_only)
        rest = (~st).nonzero()[:, 0]
        if rest.numel():
            super().select(store, q[rest], bt[rest], sl[rest], lambda name: f(name)[rest], cache, max_selected,
                           block_size, beta, every, None if clocks is None else clocks[rest], pending=pending,
                           due_only=due_only)
        if due_only:  # (reselect_async's side launch: the baseline rows have nothing to re-select)
            return
        idx = st.nonzero()[:, 0]
        key = (f("col")[idx] << 32) | (f("sink")[idx] + f("window")[idx])
        for k in torch.unique(key).tolist():
            i = idx[key == k]
            g = lambda name: f(name)[i]  # noqa: E731
            cap = k & 0xFFFFFFFF
            sel = select_blocks(store.summ[METHOD_NAMES[k >> 32]], bt[i], sl[i], g("budget"), g("sink"), g("window"),
                                g("mode"), g("prior"), g("tag"), cap, block_size=block_size, need_query=False,
                                use_triton=False)
            r = g("srow").long()
            cache.ids[r, :, :cap] = sel.ids.to(cache.ids.dtype)
            cache.counts[r] = sel.counts.to(cache.counts.dtype)
            cache.kcounts[r] = sel.kernel_counts().to(cache.kcounts.dtype)
            cache.dense[r] = sel.dense.to(cache.dense.dtype)
            cache.key[r] = -1  # never reused


class EvalTorchOps(_SinkWindowRows, step.TorchOps):
    """The backend's torch op set (tail scoring and selection unchanged) with the harness's attention:
    ``batched`` (default) computes what ``sparse_decode_ref`` computes, in ``dtype``, vectorised over rows: rows
    whose block tables share their first ``prefix_blocks`` blocks (a trial's rows) meet those keys in one matmul,
    each row's later blocks in a second batch; ``ref``: ``sparse_decode_ref`` row by row (exact reference, slow)."""

    name = "eval-torch"

    def __init__(self, prefix_blocks: int, impl: str = "batched", dtype: torch.dtype = torch.float64):
        self.prefix_blocks, self.impl, self.dtype = prefix_blocks, impl, dtype

    def attend(self, q, kv, bt, sl, cache, srow, scale, out) -> None:
        r = srow.long()
        ids, counts = cache.ids[r], cache.kcounts[r]
        if self.impl == "ref":
            out.copy_(sparse_decode_ref(q, kv, bt, sl, ids, counts, scale, dtype=self.dtype))
        else:
            out.copy_(batched_attention(q, kv, bt, sl, ids, counts, scale, self.prefix_blocks, self.dtype))


class EvalTritonOps(_SinkWindowRows, step.TritonOps):
    """The backend's Triton op set (CUDA), plus the sink+window rows' selection."""

    name = "eval-triton"


def batched_attention(q, kv, bt, sl, ids, counts, scale, prefix_blocks: int, dtype) -> torch.Tensor:
    """``sparse_decode_ref(q, kv, bt, sl, ids, counts, scale, dtype)`` vectorised (see :class:`EvalTorchOps`);
    ``counts`` < 0: every block of the row (dense). Returns ``[B, Hq, D]`` in ``dtype``."""
    B, Hq, D = q.shape
    H, BS = kv.shape[1], kv.shape[2]
    G, P = Hq // H, prefix_blocks
    N = P * BS
    dev = q.device
    seq = sl.long()
    top = int(seq.max())
    nblk = -(-top // BS)
    j = torch.arange(ids.shape[2], device=dev)
    valid = j[None, None, :] < counts[:, :, None].clamp_min(0)
    bm = torch.zeros(B, H, nblk + 1, dtype=torch.bool, device=dev)
    bm.scatter_(2, torch.where(valid, ids.long().clamp_max(nblk), nblk), valid)
    bm = bm[:, :, :nblk] | (counts < 0)[:, :, None]
    tok = bm.repeat_interleave(BS, dim=2)[:, :, :top] & (torch.arange(top, device=dev) < seq[:, None])[:, None, :]
    qg = q.to(dtype).reshape(B, H, G, D) * scale
    groups = torch.unique(bt[:, :P].long(), dim=0, return_inverse=True)[1]
    s_pre = torch.empty(B, H, G, N, dtype=dtype, device=dev)
    pre = []
    for u in range(int(groups.max()) + 1):
        r = (groups == u).nonzero()[:, 0]
        kvp = kv[bt[r[0], :P].long()].permute(1, 0, 2, 3).reshape(H, N, 2 * D).to(dtype)  # [H, N, 2D]
        qt = qg[r].permute(1, 0, 2, 3).reshape(H, -1, D)  # [H, n*G, D]
        s_pre[r] = (qt @ kvp[..., :D].transpose(1, 2)).view(H, len(r), G, N).permute(1, 0, 2, 3)
        pre.append((r, kvp[..., D:]))
    tb = kv[bt[:, P:nblk].long()]  # [B, nblk - P, H, BS, 2D]: each row's blocks after the prefix
    tb = tb.permute(0, 2, 1, 3, 4).reshape(B, H, -1, 2 * D)[:, :, :top - N].to(dtype)
    s = torch.cat([s_pre, qg @ tb[..., :D].transpose(2, 3)], -1)
    p = torch.softmax(s.masked_fill(~tok[:, :, None, :], float("-inf")), dim=-1)
    o = p[..., N:] @ tb[..., D:]  # [B, H, G, D]
    for r, v in pre:
        pt = p[r, :, :, :N].permute(1, 0, 2, 3).reshape(H, -1, N)
        o[r] += (pt @ v).view(H, len(r), G, D).permute(1, 0, 2, 3)
    return o.reshape(B, Hq, D)


def sliding_prefill(q, k, v, window: int, scale: float, chunk: int = 1024) -> torch.Tensor:
    """Causal attention where query i sees keys (i - window, i] (gemma-3's sliding layers), chunked over the
    queries so the mask stays [chunk, chunk + window]. q [B, Hq, N, D], k/v [B, Hkv, N, D]."""
    B, Hq, N, D = q.shape
    out = torch.empty_like(q)
    for s in range(0, N, chunk):
        e, ks = min(N, s + chunk), max(0, s - window + 1)
        i = torch.arange(s, e, device=q.device)[:, None]
        j = torch.arange(ks, e, device=q.device)[None, :]
        out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e],
                                                         attn_mask=(j <= i) & (i - j < window), scale=scale,
                                                         enable_gqa=Hq != k.shape[1])
    return out


def sliding_decode(q, kv, bt, pos: int, window: int, scale: float, block_size: int) -> torch.Tensor:
    """One decode token per row at position ``pos`` attending its last ``window`` keys (itself included) in the
    paged cache ``kv [NB, Hkv, BS, 2D]`` through the block table ``bt [n, MB]``; q [n, Hq, D]. float32 (CUDA) /
    float64 (CPU) softmax, returned in that dtype."""
    n, Hq, D = q.shape
    H = kv.shape[1]
    dt = torch.float32 if q.is_cuda else torch.float64
    p = torch.arange(max(0, pos - window + 1), pos + 1, device=q.device)
    phys = bt[:, p // block_size].long()  # [n, W]
    kvw = kv[phys[:, :, None], torch.arange(H, device=q.device)[None, None, :], (p % block_size)[None, :, None]]
    k = kvw[..., :D].to(dt).repeat_interleave(Hq // H, dim=2)  # [n, W, Hq, D]
    v = kvw[..., D:].to(dt).repeat_interleave(Hq // H, dim=2)
    w = torch.softmax(torch.einsum("nhd,nwhd->nhw", q.to(dt), k) * scale, dim=-1)
    return torch.einsum("nhw,nwhd->nhd", w, v)


def paged_cache(num_blocks: int, num_kv_heads: int, block_size: int, head_size: int, dtype, device) -> torch.Tensor:
    """A zeroed ``[NB, Hkv, BS, 2D]`` KV cache whose pages carry the padding the backend's ``customize_spec``
    adds (``extra_page_bytes``), so the :class:`LayerStore` keeps its summaries in it as in the server."""
    el = torch.empty((), dtype=dtype).element_size()
    page = num_kv_heads * block_size * 2 * head_size
    stride = page + extra_page_bytes(num_kv_heads, head_size, block_size, dtype, mirror=False) // el
    raw = torch.zeros(num_blocks, stride, dtype=dtype, device=device)
    return raw[:, :page].view(num_blocks, num_kv_heads, block_size, 2 * head_size)


class _Table:
    """The request table the planner reads (the fields of ``prescore.backend.requests.RequestTable`` that
    ``plan.plan`` uses; that module imports vLLM): slot -> params, prefill length, tag, admission serial."""

    def __init__(self, capacity: int, defaults: PrescoreParams):
        self.defaults, self.capacity = defaults, capacity
        self.params: list = [None] * capacity
        self.prefill_len, self.tag, self.serial = [0] * capacity, [-1] * capacity, [0] * capacity

    def slots(self, num_rows: int, req_idx) -> list[int]:
        return [int(r) for r in req_idx[:num_rows].tolist()]

    def live(self, slots: list[int], qlens, seq) -> list[int]:  # no dummy batches here: every row is its slot's
        return slots


class _Group:
    """The rows of one (quest_beta, reselect_every) setting: planned and stepped together."""

    def __init__(self, beta: float, every: int):
        self.beta, self.every = beta, every
        self.rows: list[int] = []  # model rows (slots)
        self.fid: list[int] = []  # fidelity slots
        self.bufs: DecodeBuffers | None = None


class SparseEvalEngine:
    def __init__(self, model, block_size: int = 16, sink: int = 16, window: int = 64,
                 hybrid_prior_fraction: float | None = None, use_triton: bool | None = None,
                 ref_dtype: torch.dtype = torch.float64, cache_dtype: torch.dtype | None = None,
                 decode_impl: str | None = None, quest_beta: float | None = None,
                 hybrid_min_budget: int | None = None, reselect_every: int | None = None,
                 reselect_async: bool | None = None):
        register()
        self.model = model
        cfg = model.config
        self.L = cfg.num_hidden_layers
        # models mixing sliding-window and full-attention layers (gemma-3): a sliding layer runs dense within its
        # window, as the backend leaves it to vLLM's kernel; only full-attention layers run the sparse step
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * self.L
        self.window_of = [cfg.sliding_window if t == "sliding_attention" else None for t in types]
        self.Hq = cfg.num_attention_heads
        self.Hkv = cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.BS = block_size
        d = PrescoreParams()  # None: the backend's defaults
        over = {k: v for k, v in dict(sink=sink, window=window, hybrid_prior_fraction=hybrid_prior_fraction,
                                      quest_beta=quest_beta, hybrid_min_budget=hybrid_min_budget,
                                      reselect_every=reselect_every, reselect_async=reselect_async).items()
                if v is not None}
        self.defaults = replace(d, **over)  # the "server" config of every row (budgets per config: params())
        self.sink, self.window = self.defaults.sink, self.defaults.window
        self.frac = self.defaults.hybrid_prior_fraction
        self.quest_beta = self.defaults.quest_beta
        self.hybrid_min_budget = self.defaults.hybrid_min_budget
        self.reselect_every = self.defaults.reselect_every
        p = next(model.parameters())
        self.device, self.dtype = p.device, cache_dtype or p.dtype
        self.use_triton = (self.device.type == "cuda") if use_triton is None else use_triton
        self.ref_dtype = ref_dtype
        # triton: the backend's Triton op set (CUDA); batched (CPU default) / ref: the torch op set with the
        # harness's attention (vectorised over a trial's rows / sparse_decode_ref row by row)
        self.decode_impl = decode_impl or ("triton" if self.use_triton else "batched")
        if model.config._attn_implementation != ATTN_NAME:
            model.set_attn_implementation(ATTN_NAME)

    # ------------------------------------------------------------------ configs -> request params
    def params(self, c: Config) -> PrescoreParams:
        """The config boundary: a table row's setting as the backend's request params (``budget`` = the tokens
        beyond sink + window; 0 = dense). Raises ValueError for a budget that leaves nothing to select."""
        d, BS = self.defaults, self.BS
        if c.mode == "dense":
            return replace(d, budget=0)
        sink_b, win_b, tot_b = -(-d.sink // BS), -(-d.window // BS), c.budget // BS
        if c.mode == "static":
            if tot_b <= sink_b:
                raise ValueError(f"budget {c.budget} leaves no window after a {d.sink}-token sink")
            return replace(d, method="keynorm", mode="prior", budget=BS, window=(tot_b - sink_b) * BS)
        sel = tot_b - sink_b - win_b
        if sel < 1:
            raise ValueError(f"budget {c.budget} must exceed sink {d.sink} + window {d.window} by a block")
        return replace(d, method=c.summ_method, mode=c.mode, budget=sel * BS)

    def beta_of(self, c: Config) -> float:
        return self.quest_beta if c.beta is None else c.beta

    def every_of(self, c: Config) -> int:
        return self.reselect_every if c.every is None else c.every

    def row_fields(self, c: Config) -> dict:
        """Extra keys of a result row: the quest_beta and reselect_every a query-aware config ran with, and its
        sweep variant."""
        out = ({"quest_beta": self.beta_of(c), "reselect_every": self.every_of(c)}
               if c.mode in ("quest", "hybrid") else {})
        return {**out, "variant": c.variant} if c.variant else out

    # ------------------------------------------------------------------ run
    @torch.no_grad()
    def run(self, prefix_ids: torch.Tensor, feed_ids: torch.Tensor, target_ids: torch.Tensor,
            configs: list[Config], fidelity_steps: int = 0, prefill_batch: int = 4, log=None) -> dict:
        """prefix [T, N] (dense prefill), feed/target [T, M] (decode steps). Returns ``nll`` [T, C, M] float32,
        ``hit`` [T, C, M] bool (argmax == target), ``fidelity`` [C, L] mean relative error of the attention
        output vs dense on the dense rows' own queries/caches over the first ``fidelity_steps`` steps (NaN for
        dense), ``timing``."""
        global _ACTIVE
        import time

        T, N = prefix_ids.shape
        M = feed_ids.shape[1]
        BS, L, H, D = self.BS, self.L, self.Hkv, self.D
        if N % BS:
            raise ValueError(f"prefill length {N} must be a multiple of the block size {BS}")
        C = len(configs)
        R = T * C
        P, Tb = N // BS, -(-M // BS)
        dev = self.device
        self.T, self.C, self.R, self.N = T, C, R, N
        self._setup_rows(configs, fidelity_steps)
        S = self.slots
        NB = T * P + R * Tb
        ar = torch.arange
        bt = torch.empty(S, P + Tb, dtype=torch.int32)
        trial = ar(R) // C
        bt[:R, :P] = (trial[:, None] * P + ar(P)[None, :]).int()
        bt[:R, P:] = (T * P + ar(R)[:, None] * Tb + ar(Tb)[None, :]).int()
        bt[R:] = bt[self.fid_src]  # a fidelity row reads its trial's dense row's cache
        self.bt = bt.to(dev)
        self.fid_src_dev = self.fid_src.to(dev)
        states = state_floats(sorted({self.table.params[s].method for s in range(S)}), D)
        self.kv, self.stores = [], []
        for _ in range(L):
            kv = paged_cache(NB, H, BS, D, self.dtype, dev)
            store = LayerStore(kv, mirror=False, num_slots=S,
                               states=torch.zeros(S, H, states, dtype=torch.float32, device=dev))
            store.selection_cache(self.capacity, self.max_rows)
            self.kv.append(kv)
            self.stores.append(store)
        self.ops = self._ops(P)
        self.configs = configs
        self.fid_sum = torch.zeros(C, L, dtype=torch.float64)
        self.fid_n = torch.zeros(C, L, dtype=torch.float64)

        timing = {}
        _ACTIVE = self
        try:
            t0 = time.perf_counter()
            self.phase = "prefill"
            base = self.model.model
            for s in range(0, T, prefill_batch):
                ids = prefix_ids[s:s + prefill_batch].to(dev)
                self.prefill_trials = list(range(s, s + ids.shape[0]))
                pos = ar(N, device=dev)[None, :].expand(ids.shape[0], N)
                base(input_ids=ids, position_ids=pos, use_cache=False)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            timing["prefill_s"] = time.perf_counter() - t0
            if log:
                log(f"    prefill {T} x {N} tokens: {timing['prefill_s']:.1f}s; decoding {M} steps x {R} rows")
            t0 = time.perf_counter()
            self.phase = "decode"
            nll = torch.empty(R, M, dtype=torch.float32)
            hit = torch.empty(R, M, dtype=torch.bool)
            feed = feed_ids.to(dev)[trial.to(dev)]  # [R, M]
            tgt = target_ids.to(dev)[trial.to(dev)]
            for j in range(M):
                self.pos = N + j
                self.fidelity = j < fidelity_steps and bool(self.fid_cfg)
                self._plan_step(N + j + 1)
                out = self.model(input_ids=feed[:, j:j + 1], position_ids=torch.full((R, 1), N + j, device=dev),
                                 use_cache=False)
                logits = out.logits[:, -1].float()
                nll[:, j] = F.cross_entropy(logits, tgt[:, j], reduction="none").cpu()
                hit[:, j] = (logits.argmax(-1) == tgt[:, j]).cpu()
                if log and (j + 1) % 16 == 0 and j + 1 < M:
                    log(f"    step {j + 1}/{M}: {time.perf_counter() - t0:.1f}s")
            timing["decode_s"] = time.perf_counter() - t0
        finally:
            _ACTIVE = None
            self.kv = self.stores = self.plans = None
        fid = torch.where(self.fid_n > 0, self.fid_sum / self.fid_n.clamp_min(1), float("nan"))
        return {"nll": nll.view(T, C, M), "hit": hit.view(T, C, M), "fidelity": fid, "timing": timing}

    def _setup_rows(self, configs, fidelity_steps):
        """The request table (one slot per row: trial-major over configs, then the fidelity rows: each sparse
        config on each trial's dense row), the prefill scoring rows and the plan groups."""
        T, C, R, BS = self.T, self.C, self.R, self.BS
        ps = [self.params(c) for c in configs]
        dense = [i for i, c in enumerate(configs) if c.mode == "dense"]
        self.fid_cfg = [i for i, c in enumerate(configs) if c.mode != "dense"] if dense and fidelity_steps else []
        fid = [(i, t) for i in self.fid_cfg for t in range(T)]  # slot R + k
        self.fid_src = torch.tensor([t * C + dense[0] for _, t in fid], dtype=torch.long)
        S = self.slots = R + len(fid)
        cfg_of = [r % C for r in range(R)] + [i for i, _ in fid]
        trial_of = [r // C for r in range(R)] + [t for _, t in fid]
        table = self.table = _Table(S, self.defaults)
        for s in range(S):
            p, t = ps[cfg_of[s]], trial_of[s]
            table.params[s], table.prefill_len[s], table.serial[s] = p, self.N, s + 1
            # a trial's rows share its prefix blocks (the server's prefix cache): one tag per (trial, method), one
            # for every stateless method (its scores are content-only), as the server's content tags give
            table.tag[s] = 2 if stateless(p.method) else 4 + 2 * t
        # prefill scoring: one fit per (trial, method) a budgeted row uses, copied to that trial's other rows of it
        self.fits: dict[int, list] = {}  # trial -> [(PrefillRow, sibling slots)]
        for s in range(S):
            p, t = ps[cfg_of[s]], trial_of[s]
            if p.budget == 0:
                continue
            fits = self.fits.setdefault(t, [])
            for row, sib in fits:
                if row.method == p.method:
                    sib.append(s)
                    break
            else:
                fits.append((PrefillRow(s, 0, self.N, True, s, p.method, p.mode, table.tag[s]), []))
        groups: dict[tuple, _Group] = {}
        for s in range(S):
            c = configs[cfg_of[s]]
            key = (self.beta_of(c), self.every_of(c))
            g = groups.setdefault(key, _Group(*key))
            (g.rows if s < R else g.fid).append(s)
        self.groups = list(groups.values())
        self.max_rows = max(len(g.rows) + len(g.fid) for g in self.groups)
        for g in self.groups:
            g.bufs = DecodeBuffers(self.max_rows, self.device)
        # selection capacity: every row's sink + window + budget (no row overflows into dense)
        self.capacity = max([sum(p.blocks(BS)[:3]) + 1 for p in ps if p.budget] + [1])
        self.static = torch.zeros(S + self.max_rows, dtype=torch.bool, device=self.device)
        self.static[[s for s in range(S) if configs[cfg_of[s]].mode == "static"]] = True

    def _ops(self, prefix_blocks: int):
        if self.decode_impl == "triton":
            ops = EvalTritonOps()
        else:
            ops = EvalTorchOps(prefix_blocks, self.decode_impl, self.ref_dtype)
        ops.static = self.static
        return ops

    def _plan_step(self, seq_len: int) -> None:
        """The backend's planner for this step, once per (quest_beta, reselect_every) group (its rows, plus the
        fidelity rows in fidelity steps): a uniform plan (every row single-token decode; dense rows as padding)."""
        self.n = self.slots if self.fidelity else self.R
        self.seq = torch.full((self.n,), seq_len, dtype=torch.int32, device=self.device)
        self.plans = []
        for g in self.groups:
            rows = g.rows + (g.fid if self.fidelity else [])
            if not rows:
                continue
            idx = torch.tensor(rows, dtype=torch.long)
            cm = SimpleNamespace(num_reqs=len(rows), query_start_loc_cpu=torch.arange(len(rows) + 1),
                                 seq_lens_cpu_upper_bound=torch.full((len(rows),), seq_len), req_idx=idx)
            pl = plan_step(cm, self.BS, g.bufs, self.table, max_selected=self.capacity, fused_dense=True)
            pl.quest_beta, pl.every = g.beta, g.every
            whole = len(self.groups) == 1 and rows == list(range(self.n))
            self.plans.append((None if whole else idx.to(self.device), pl))

    # ------------------------------------------------------------------ attention
    def attend(self, module, q, k, v, scaling):
        layer = module.layer_idx
        scale = scaling if scaling is not None else 1.0 / math.sqrt(self.D)
        if self.phase == "prefill":
            return self._prefill(layer, q, k, v, scale)
        return self._decode(layer, q, k, v, scale)

    def _prefill(self, layer, q, k, v, scale):
        B, Hq, N, D = q.shape
        W = self.window_of[layer]
        if W:
            out = sliding_prefill(q, k, v, W, scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hq != k.shape[1])
        P, BS, H = N // self.BS, self.BS, self.Hkv
        kv, store = self.kv[layer], self.stores[layer]
        t0 = self.prefill_trials[0]
        blocks = slice(t0 * P, (t0 + B) * P)
        kv[blocks, :, :, :D] = k.reshape(B, H, P, BS, D).transpose(1, 2).reshape(B * P, H, BS, D).to(kv.dtype)
        kv[blocks, :, :, D:] = v.reshape(B, H, P, BS, D).transpose(1, 2).reshape(B * P, H, BS, D).to(kv.dtype)
        for t in ([] if W else self.prefill_trials):  # a sliding layer is never scored (it never runs sparse)
            fits = self.fits.get(t, [])
            step.score_prefill_rows(store, [row for row, _ in fits], kv, self.bt)
            for row, sib in fits:
                if sib:
                    store.states[sib] = store.states[row.slot].clone()
        return out.transpose(1, 2)

    def _decode(self, layer, q, k, v, scale):
        R, Hq, _, D = q.shape
        BS, pos = self.BS, self.pos
        kv, store = self.kv[layer], self.stores[layer]
        phys = self.bt[:R, pos // BS].long()
        kv[phys, :, pos % BS, :D] = k[:, :, 0].to(kv.dtype)
        kv[phys, :, pos % BS, D:] = v[:, :, 0].to(kv.dtype)
        W = self.window_of[layer]
        if W:  # dense within the window for every row (no fidelity rows: their error would be 0 here)
            return sliding_decode(q[:, :, 0], kv, self.bt[:R], pos, W, scale, BS).to(q.dtype)[:, None]
        qd = q[:, :, 0]
        if self.n > R:
            qd = torch.cat([qd, qd[self.fid_src_dev]])
        qd = qd.contiguous()
        bt, seq = self.bt[:self.n], self.seq
        out = torch.empty(self.n, Hq, D, dtype=q.dtype if self.decode_impl == "triton" else self.ref_dtype,
                          device=q.device)
        for idx, pl in self.plans:
            if idx is None:
                step.run(store, pl, qd, kv, bt, seq, out, scale, BS, self.ops)
            else:
                o = out.new_empty(len(idx), Hq, D)
                step.run(store, pl, qd[idx], kv, bt[idx], seq[idx], o, scale, BS, self.ops)
                out[idx] = o
        if self.n > R:
            self._fidelity(layer, out)
        return out[:R].to(q.dtype)[:, None]

    def _fidelity(self, layer, out):
        """Relative error of each fidelity row's output vs its dense row's, per (sparse config, layer)."""
        ref = out[self.fid_src_dev].double().flatten(1)
        err = (out[self.R:].double().flatten(1) - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
        err = err.view(len(self.fid_cfg), self.T).cpu()
        self.fid_sum[self.fid_cfg, layer] += err.sum(1)
        self.fid_n[self.fid_cfg, layer] += self.T
