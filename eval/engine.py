"""Decode-mode sparse attention inside a transformers model, through prescore's own kernels.

:class:`SparseEvalEngine` registers an attention function with transformers' ``AttentionInterface`` (name
``prescore_eval``); the model keeps its own projections, RoPE, norms and MLPs, only the attention call is ours:

- **prefill** (``Engine.run`` feeds ``prefix_ids [T, N]``, ``N % block_size == 0``): dense causal attention
  (``torch.nn.functional.scaled_dot_product_attention``); the layer's K/V go into a paged cache laid out like
  vLLM's (``[num_blocks, Hkv, block_size, 2*D]``, K in ``[..., :D]``, V in ``[..., D:]``) and
  ``score_prefill`` fits and scores every prior method on it (one tag per trial).
- **decode** (one token per row per step, rows = trials x configs): the new K/V is written to the row's own
  tail block, ``score_decode_tail`` rescores it, ``select_blocks`` picks blocks per (row, KV head) with the
  row's budget/sink/window/mode, and ``sparse_decode_ref`` (CPU) or the Triton ``sparse_decode`` (CUDA)
  attends them. The prefix blocks of a trial are shared by all of its rows (like vLLM's prefix cache).

Budget convention: a config's ``budget`` is the TOTAL number of key tokens attended per KV head (sink +
window + selected, in whole blocks); the backend's ``prescore_budget`` equals ``budget - sink - window``.
``sink+window`` (StreamingLLM) spends the whole budget on the window: ``select_blocks`` in prior mode with
1 budget block and a capacity (``max_selected``) of exactly sink + window blocks, so only the forced blocks fit.
A row whose context fits its budget is dense (``select_blocks`` says so) and runs the same code as the dense
row: at budget >= context the result equals dense exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prescore.backend.params import PrescoreParams, hybrid_prior_blocks
from prescore.kernels import (METHODS, MODES, BlockSummaries, SelectionCache, get_method, score_decode_tail,
                              score_prefill, select_blocks, sparse_decode, sparse_decode_ref)

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
        """Which BlockSummaries it reads (stateless keynorm's for the modes that ignore the prior)."""
        return self.method if self.method in PRIOR_METHODS else "keynorm"


def make_configs(budgets, methods=PRIOR_METHODS, modes=("static", "prior", "quest", "hybrid"),
                 quest_betas=(), reselect_everys=()) -> list[Config]:
    """Dense, then per budget every mode (prior/hybrid once per method); ``quest_betas``: extra quest rows at
    those ``quest_beta`` values (a sweep; the plain quest row runs at the engine's); ``reselect_everys``: extra
    quest and hybrid (first method) rows at those re-selection intervals."""
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
        for e in reselect_everys:
            out += [Config("quest", "quest", int(b), every=int(e)), Config(methods[0], "hybrid", int(b), every=int(e))]
    return out


@dataclass
class Controls:
    budget: int  # blocks (select_blocks' budget_blocks)
    sink: int
    window: int
    mode: int
    prior: int
    cap: int  # max_selected for this row


class SparseEvalEngine:
    def __init__(self, model, block_size: int = 16, sink: int = 16, window: int = 64,
                 hybrid_prior_fraction: float | None = None, use_triton: bool | None = None,
                 ref_dtype: torch.dtype = torch.float64, cache_dtype: torch.dtype | None = None,
                 decode_impl: str | None = None, quest_beta: float | None = None,
                 hybrid_min_budget: int | None = None, reselect_every: int | None = None):
        register()
        self.model = model
        cfg = model.config
        self.L = cfg.num_hidden_layers
        self.Hq = cfg.num_attention_heads
        self.Hkv = cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.BS = block_size
        d = PrescoreParams()  # None: the backend's defaults
        self.sink, self.window = sink, window
        self.frac = d.hybrid_prior_fraction if hybrid_prior_fraction is None else hybrid_prior_fraction
        self.quest_beta = d.quest_beta if quest_beta is None else quest_beta
        self.hybrid_min_budget = d.hybrid_min_budget if hybrid_min_budget is None else hybrid_min_budget
        self.reselect_every = d.reselect_every if reselect_every is None else reselect_every
        p = next(model.parameters())
        self.device, self.dtype = p.device, cache_dtype or p.dtype
        self.use_triton = (self.device.type == "cuda") if use_triton is None else use_triton
        self.ref_dtype = ref_dtype
        # triton: prescore's sparse_decode (CUDA); ref: sparse_decode_ref row by row (exact reference, slow);
        # batched: the same attention over the same selected blocks, vectorised over rows (CPU default)
        self.decode_impl = decode_impl or ("triton" if self.use_triton else "batched")
        self.methods = {m: get_method(m) for m in PRIOR_METHODS}
        if model.config._attn_implementation != ATTN_NAME:
            model.set_attn_implementation(ATTN_NAME)

    # ------------------------------------------------------------------ controls
    def controls(self, c: Config) -> Controls | None:
        if c.mode == "dense":
            return None
        BS = self.BS
        sink_b, win_b, tot_b = -(-self.sink // BS), -(-self.window // BS), c.budget // BS
        if c.mode == "static":
            if tot_b <= sink_b:
                raise ValueError(f"budget {c.budget} leaves no window after a {self.sink}-token sink")
            return Controls(1, sink_b, tot_b - sink_b, MODES["prior"], 1, tot_b)
        sel = tot_b - sink_b - win_b
        if sel < 1:
            raise ValueError(f"budget {c.budget} must exceed sink {self.sink} + window {self.window} by a block")
        prior = hybrid_prior_blocks(sel, sel * BS, self.frac, self.hybrid_min_budget) if c.mode == "hybrid" else sel
        return Controls(sel, sink_b, win_b, MODES[c.mode], prior, tot_b)

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
        NB = T * P + R * Tb
        self.P, self.T, self.C, self.R = P, T, C, R
        ar = torch.arange
        bt = torch.empty(R, P + Tb, dtype=torch.int32)
        trial = ar(R) // C
        bt[:, :P] = (trial[:, None] * P + ar(P)[None, :]).int()
        bt[:, P:] = (T * P + ar(R)[:, None] * Tb + ar(Tb)[None, :]).int()
        self.bt = bt.to(dev)
        self.trial = trial.to(dev)
        self.tags = trial.to(dev, torch.int64)
        self.kv = [torch.zeros(NB, H, BS, 2 * D, dtype=self.dtype, device=dev) for _ in range(L)]
        self.summ = []
        for _ in range(L):
            kmin = torch.zeros(NB, H, D, dtype=self.dtype, device=dev)
            kmax = torch.zeros_like(kmin)
            self.summ.append({m: BlockSummaries(scores=torch.zeros(NB, H, dtype=torch.float32, device=dev),
                                                kmin=kmin, kmax=kmax,
                                                tags=torch.full((NB,), -1, dtype=torch.int64, device=dev))
                              for m in PRIOR_METHODS})
        self.states = [{m: torch.zeros(T, H, obj.state_size(D), dtype=torch.float32, device=dev)
                        for m, obj in self.methods.items()} for _ in range(L)]
        if self.decode_impl == "batched":
            self.kpre = [torch.zeros(T, H, N, D, dtype=self.dtype, device=dev) for _ in range(L)]
            self.vpre = [torch.zeros(T, H, N, D, dtype=self.dtype, device=dev) for _ in range(L)]
        self.configs = configs
        self.caches = {}  # (layer, group id) -> SelectionCache: the backend's reuse schedule (reselect_every)
        self._plan(configs)
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
            feed = feed_ids.to(dev)[self.trial]  # [R, M]
            tgt = target_ids.to(dev)[self.trial]
            for j in range(M):
                self.pos = N + j
                self.fidelity = j < fidelity_steps
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
            self.kv = self.summ = self.states = self.kpre = self.vpre = self.caches = None
        fid = torch.where(self.fid_n > 0, self.fid_sum / self.fid_n.clamp_min(1), float("nan"))
        return {"nll": nll.view(T, C, M), "hit": hit.view(T, C, M), "fidelity": fid, "timing": timing}

    def _plan(self, configs):
        """Per-row control tensors and the select groups (rows sharing summaries and, for static, a capacity)."""
        dev, C, R = self.device, len(configs), self.R
        ctl = [self.controls(c) for c in configs]
        self.ctl = ctl
        self.dense_cfg = [i for i, c in enumerate(configs) if c.mode == "dense"]
        groups: dict[tuple, list[int]] = {}
        for i, (c, k) in enumerate(zip(configs, ctl)):
            if k is None:
                continue
            key = (c.summ_method, k.cap if c.mode == "static" else None, self.beta_of(c), self.every_of(c))
            groups.setdefault(key, []).append(i)
        self.groups = []
        for (m, static_cap, _, _), cfg_ids in groups.items():
            rows = torch.tensor([t * C + i for t in range(self.T) for i in cfg_ids], dtype=torch.long)
            self.groups.append(self._group(m, cfg_ids, rows))
        self.Smax = max([g["cap"] for g in self.groups] + [1])
        self.fid_groups = []  # every sparse config evaluated on the dense rows' own q / caches
        if self.dense_cfg:
            d = self.dense_cfg[0]
            drows = torch.tensor([t * C + d for t in range(self.T)], dtype=torch.long)
            for i, k in enumerate(ctl):
                if k is not None:
                    self.fid_groups.append((i, self._group(configs[i].summ_method, [i] * self.T, drows,
                                                          per_row=True)))

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

    def _group(self, m, cfg_ids, rows, per_row=False):
        dev = self.device
        ks = [self.ctl[i] for i in cfg_ids]
        if not per_row:  # rows are trial-major over cfg_ids
            ks = ks * self.T
        col = lambda f: torch.tensor([getattr(k, f) for k in ks], dtype=torch.int32, device=dev)  # noqa: E731
        modes = [k.mode for k in ks]
        return {"method": m, "rows": rows.to(dev), "budget": col("budget"), "sink": col("sink"),
                "window": col("window"), "mode": col("mode"), "prior": col("prior"),
                "cap": max(k.cap for k in ks), "need_query": any(x != MODES["prior"] for x in modes),
                "beta": self.beta_of(self.configs[cfg_ids[0]]), "every": self.every_of(self.configs[cfg_ids[0]])}

    # ------------------------------------------------------------------ attention
    def attend(self, module, q, k, v, scaling):
        layer = module.layer_idx
        scale = scaling if scaling is not None else 1.0 / math.sqrt(self.D)
        if self.phase == "prefill":
            return self._prefill(layer, q, k, v, scale)
        return self._decode(layer, q, k, v, scale)

    def _prefill(self, layer, q, k, v, scale):
        B, Hq, N, D = q.shape
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hq != k.shape[1])
        P, BS, H = self.P, self.BS, self.Hkv
        kv = self.kv[layer]
        t0 = self.prefill_trials[0]
        blocks = slice(t0 * P, (t0 + B) * P)
        kv[blocks, :, :, :D] = k.reshape(B, H, P, BS, D).transpose(1, 2).reshape(B * P, H, BS, D).to(kv.dtype)
        kv[blocks, :, :, D:] = v.reshape(B, H, P, BS, D).transpose(1, 2).reshape(B * P, H, BS, D).to(kv.dtype)
        if self.decode_impl == "batched":
            self.kpre[layer][t0:t0 + B] = k.to(self.kpre[layer].dtype)
            self.vpre[layer][t0:t0 + B] = v.to(self.vpre[layer].dtype)
        for t in self.prefill_trials:
            row = self.bt[t * self.C]
            for m, obj in self.methods.items():
                st = score_prefill(kv, self.summ[layer][m], row, 0, N, obj, t, True, use_triton=self.use_triton)
                self.states[layer][m][t, :, : st.shape[1]] = st
        return out.transpose(1, 2)

    def _attn(self, q, kv, bt, seq, ids, counts, scale, rows=None):
        if self.decode_impl == "triton":
            return sparse_decode(q, kv, bt, seq, ids, counts, scale=scale)
        if self.decode_impl == "ref":
            return sparse_decode_ref(q, kv, bt, seq, ids, counts, scale=scale, dtype=self.ref_dtype)
        return self._attn_batched(q, kv, ids, counts, scale, rows)

    def _attn_batched(self, q, kv, ids, counts, scale, rows=None):
        """What ``sparse_decode_ref`` computes (softmax over the selected blocks' valid tokens, in ``ref_dtype``),
        vectorised: rows of one trial share the prefix K/V, so q of all its rows meets the prefix in one matmul;
        each row's own tail blocks are a second small batch. ``rows``: batch row -> engine row (default all)."""
        layer = self._layer
        T, C, H, P, BS, N = self.T, self.C, self.Hkv, self.P, self.BS, self.P * self.BS
        dt = self.ref_dtype
        rows = torch.arange(self.R, device=q.device) if rows is None else rows
        B, Hq, D = q.shape
        G = Hq // H
        nblk = -(-(self.pos + 1) // BS)
        # block mask [B, H, nblk] from the selection (negative count: dense)
        j = torch.arange(ids.shape[2], device=q.device)
        valid = j[None, None, :] < counts[:, :, None].clamp_min(0)
        bm = torch.zeros(B, H, nblk + 1, dtype=torch.bool, device=q.device)
        bm.scatter_(2, torch.where(valid, ids.long().clamp_max(nblk), nblk), valid)
        bm = bm[:, :, :nblk] | (counts < 0)[:, :, None]
        tok = bm.repeat_interleave(BS, dim=2)  # [B, H, nblk*BS]
        ntail = self.pos + 1 - N
        tail_tok = tok[:, :, N:N + ntail]
        pre_tok = tok[:, :, :N]
        qg = q.to(dt).reshape(B, H, G, D) * scale
        trial = self.trial[rows]
        # prefix: per trial, all of its rows' queries at once
        s_pre = torch.empty(B, H, G, N, dtype=dt, device=q.device)
        for t in torch.unique(trial).tolist():
            r = (trial == t).nonzero()[:, 0]
            qt = qg[r].permute(1, 0, 2, 3).reshape(H, -1, D)  # [H, n*G, D]
            st = qt @ self.kpre[layer][t].to(dt).transpose(1, 2)  # [H, n*G, N]
            s_pre[r] = st.view(H, len(r), G, N).permute(1, 0, 2, 3)
        tb = kv[T * P:].view(self.R, -1, H, BS, 2 * D)[rows]  # [B, Tb, H, BS, 2D]
        tb = tb.permute(0, 2, 1, 3, 4).reshape(B, H, -1, 2 * D)[:, :, :ntail].to(dt)
        s_tail = qg @ tb[..., :D].transpose(2, 3)  # [B, H, G, ntail]
        s = torch.cat([s_pre, s_tail], -1)
        m = torch.cat([pre_tok, tail_tok], -1)[:, :, None, :]
        p = torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1)
        o = p[..., N:] @ tb[..., D:]  # [B, H, G, D]
        for t in torch.unique(trial).tolist():
            r = (trial == t).nonzero()[:, 0]
            pt = p[r, :, :, :N].permute(1, 0, 2, 3).reshape(H, -1, N)
            o[r] += (pt @ self.vpre[layer][t].to(dt)).view(H, len(r), G, D).permute(1, 0, 2, 3)
        return o.reshape(B, Hq, D)

    def _select(self, layer, g, q, seq):
        """The backend's selection for a group's rows, with its per-row selection cache: query-aware rows
        re-select every ``reselect_every`` tokens as in serving (rows gathered per batch row)."""
        rows = g["rows"]
        key = (layer, id(g))
        if key not in self.caches:
            self.caches[key] = SelectionCache.allocate(rows.numel(), self.Hkv, g["cap"], self.device)
        slots = torch.arange(rows.numel(), dtype=torch.int32, device=self.device)
        return select_blocks(self.summ[layer][g["method"]], self.bt[rows], seq[rows], g["budget"], g["sink"],
                             g["window"], g["mode"], g["prior"], self.tags[rows], g["cap"], q=q[rows],
                             block_size=self.BS, need_query=g["need_query"], use_triton=self.use_triton,
                             quest_beta=g["beta"], cache=self.caches[key], rows=slots,
                             every=g["every"]).per_row()

    def _decode(self, layer, q, k, v, scale):
        R, Hq, _, D = q.shape
        BS, pos, H = self.BS, self.pos, self.Hkv
        self._layer = layer
        kv = self.kv[layer]
        phys = self.bt[:, pos // BS].long()
        kv[phys, :, pos % BS, :D] = k[:, :, 0].to(kv.dtype)
        kv[phys, :, pos % BS, D:] = v[:, :, 0].to(kv.dtype)
        seq = torch.full((R,), pos + 1, dtype=torch.int32, device=self.device)
        for m, obj in self.methods.items():  # every row's tail block, in every method's summaries
            score_decode_tail(kv, self.summ[layer][m], self.bt, seq,
                              torch.full((R,), METHODS[m].method_id, dtype=torch.int32, device=self.device),
                              self.states[layer][m][self.trial], self.tags, {METHODS[m].method_id: obj},
                              use_triton=self.use_triton)
        qd = q[:, :, 0].contiguous()
        ids = torch.zeros(R, H, self.Smax, dtype=torch.int32, device=self.device)
        counts = torch.full((R, H), -1, dtype=torch.int32, device=self.device)  # dense unless selected
        for g in self.groups:
            sel = self._select(layer, g, qd, seq)
            ids[g["rows"], :, : sel.ids.shape[2]] = sel.ids
            counts[g["rows"]] = sel.kernel_counts()
        out = self._attn(qd, kv, self.bt, seq, ids, counts, scale)
        if self.fidelity and self.fid_groups:
            self._fidelity(layer, qd, kv, seq, out, scale)
        return out.to(q.dtype)[:, None]

    def _fidelity(self, layer, qd, kv, seq, out, scale):
        drows = self.fid_groups[0][1]["rows"]
        ref = out[drows].double()
        ref_n = ref.flatten(1).norm(dim=1).clamp_min(1e-30)
        for i, g in self.fid_groups:
            sel = self._select(layer, g, qd, seq)
            o = self._attn(qd[drows], kv, self.bt[drows], seq[drows], sel.ids, sel.kernel_counts(), scale, drows)
            err = (o.double() - ref).flatten(1).norm(dim=1) / ref_n
            self.fid_sum[i, layer] += float(err.sum())
            self.fid_n[i, layer] += err.numel()
