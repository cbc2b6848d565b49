"""Query-independent block pre-scoring over the paged KV cache.

Scoring methods are small registered classes (``@register_method``) with one shape contract:

- ``fit(keys)``: ``keys`` ``[H, T, D]`` float32 (one sequence, one layer, all KV heads) -> ``state``
  ``[H, S]`` float32 with ``S = state_size(D)`` (0 for stateless methods). Called once per (sequence, layer)
  at the end of its prefill.
- ``score(keys, state)``: ``keys`` ``[..., H, N, D]`` float32, ``state`` ``[..., H, S]`` -> ``[..., H, N]``
  float32, higher = more important. Pure function of the key and the fitted state (never of the query).

A block's score is the maximum of its valid keys' scores (an outlier key makes its block worth keeping).
Alongside, each block gets per-channel key min/max summaries (Quest) for query-aware selection.

Per-block storage lives in :class:`BlockSummaries` (indexed by PHYSICAL block id, one per layer):
``scores [num_blocks, H]`` f32, ``kmin``/``kmax`` ``[num_blocks, H, D]`` (cache dtype), ``tags [num_blocks]``
int64 = the id of the request that scored the block. Selection treats a block whose tag is not the reading
request's as must-attend, so a freed-and-reused or prefix-shared block never contributes a stale score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

METHODS: dict[str, type["ScoringMethod"]] = {}


def register_method(cls):
    if cls.name in METHODS:
        raise ValueError(f"scoring method {cls.name!r} already registered")
    METHODS[cls.name] = cls
    cls.method_id = len(METHODS) - 1
    return cls


def get_method(name: str, **kwargs) -> "ScoringMethod":
    try:
        return METHODS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown scoring method {name!r}; choose one of {sorted(METHODS)}") from None


class ScoringMethod:
    name: ClassVar[str]
    method_id: ClassVar[int]

    def state_size(self, head_size: int) -> int:
        return 0

    def fit(self, keys: torch.Tensor) -> torch.Tensor:
        return keys.new_zeros(keys.shape[0], 0)

    def score(self, keys: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_method
class KeyNorm(ScoringMethod):
    """Score = L2 norm of the key. Stateless."""

    name = "keynorm"

    def score(self, keys, state):
        return torch.linalg.vector_norm(keys, dim=-1)


@register_method
class Leverage(ScoringMethod):
    """Ridge leverage of the centred key: l_i = (k_i - mu)^T (K_c^T K_c + lam I)^-1 (k_i - mu).

    ``lam = ridge * trace(K_c^T K_c) / D``. The fit computes the exact D x D Gram matrix per KV head; the
    prompt's keys are scored exactly with its inverse. The stored state (for blocks that fill during decode)
    is compact: mean, the top ``rank`` eigenpairs of the inverse and the mean of the remaining eigenvalues,
    i.e. ``S = D + rank * D + rank + 1`` floats per KV head.
    """

    name = "leverage"

    def __init__(self, ridge: float = 1e-2, rank: int = 16):
        self.ridge = ridge
        self.rank = rank

    def state_size(self, head_size):
        r = min(self.rank, head_size)
        return head_size + r * head_size + r + 1

    def _gram(self, keys):
        mu = keys.mean(dim=1, keepdim=True)  # [H, 1, D]
        kc = keys - mu
        gram = kc.transpose(1, 2) @ kc  # [H, D, D]
        D = keys.shape[-1]
        lam = self.ridge * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-12) / D  # [H]
        eye = torch.eye(D, device=keys.device, dtype=keys.dtype)
        return mu, kc, gram + lam[:, None, None] * eye

    def exact_scores(self, keys):
        """Exact ridge leverage of every key of the fit (prompt): [H, T, D] -> [H, T]."""
        _, kc, reg = self._gram(keys)
        chol = torch.linalg.cholesky(reg)
        z = torch.linalg.solve_triangular(chol, kc.transpose(1, 2), upper=False)  # [H, D, T]
        return (z * z).sum(1)

    def fit(self, keys):
        H, T, D = keys.shape
        mu, _, reg = self._gram(keys)
        evals, evecs = torch.linalg.eigh(reg)  # ascending
        r = min(self.rank, D)
        top = evecs[:, :, :r]  # smallest eigenvalues of reg = largest of reg^-1
        inv_top = 1.0 / evals[:, :r]
        rest = (1.0 / evals[:, r:]).mean(-1, keepdim=True) if r < D else evals.new_zeros(H, 1)
        return torch.cat([mu[:, 0], top.transpose(1, 2).reshape(H, r * D), inv_top, rest], dim=-1)

    def score(self, keys, state):
        D = keys.shape[-1]
        r = min(self.rank, D)
        mu = state[..., :D]
        u = state[..., D:D + r * D].unflatten(-1, (r, D))  # [..., H, r, D]
        inv_top = state[..., D + r * D:D + r * D + r]
        rest = state[..., -1:]
        kc = keys - mu.unsqueeze(-2)  # [..., H, N, D]
        proj = kc @ u.transpose(-1, -2)  # [..., H, N, r]
        total = (kc * kc).sum(-1)
        inside = (proj * proj).sum(-1)
        return (proj * proj * inv_top.unsqueeze(-2)).sum(-1) + (total - inside).clamp_min(0) * rest


@register_method
class KMeans(ScoringMethod):
    """The paper's outlier score: per-sequence, per-KV-head k-means (k-means++ init + Lloyd iterations).

    Key score = distance to its centroid / sum of those distances in its cluster (keys of small or spread
    clusters score high). State: centroids and per-cluster distance sums, ``S = k * D + k`` per KV head.
    """

    name = "kmeans"

    def __init__(self, k: int = 32, iters: int = 5, init_sample: int = 4096, seed: int = 0):
        self.k = k
        self.iters = iters
        self.init_sample = init_sample
        self.seed = seed

    def state_size(self, head_size):
        return self.k * head_size + self.k

    @staticmethod
    def _sqdist(x, c):  # x [H, N, D], c [H, k, D] -> [H, N, k]
        return ((x * x).sum(-1, keepdim=True) - 2 * x @ c.transpose(1, 2) + (c * c).sum(-1)[:, None, :]).clamp_min(0)

    def _init_pp(self, x, k, gen):
        """k-means++ (D^2 sampling through the Gumbel-max trick: no host sync, batched over heads)."""
        H, N, D = x.shape
        idx0 = torch.randint(0, N, (H,), device=x.device, generator=gen)
        cents = [x[torch.arange(H, device=x.device), idx0]]
        d2 = ((x - cents[0][:, None]) ** 2).sum(-1)
        gumbel = -torch.log(-torch.log(torch.rand(k, H, N, device=x.device, generator=gen).clamp(1e-20, 1 - 1e-7)))
        for j in range(1, k):
            logits = torch.log(d2.clamp_min(1e-30)) + gumbel[j]
            nxt = x[torch.arange(H, device=x.device), logits.argmax(-1)]
            cents.append(nxt)
            d2 = torch.minimum(d2, ((x - nxt[:, None]) ** 2).sum(-1))
        return torch.stack(cents, 1)

    def fit(self, keys):
        H, T, D = keys.shape
        k = min(self.k, T)
        gen = torch.Generator(device=keys.device)
        gen.manual_seed(self.seed)
        sample = keys
        if T > self.init_sample:
            sel = torch.randperm(T, device=keys.device, generator=gen)[: self.init_sample]
            sample = keys[:, sel]
        cents = self._init_pp(sample, k, gen)
        ones = keys.new_ones(H, T)
        for _ in range(self.iters):
            assign = self._sqdist(keys, cents).argmin(-1)  # [H, T]
            sums = keys.new_zeros(H, k, D).scatter_add_(1, assign[..., None].expand(H, T, D), keys)
            cnt = keys.new_zeros(H, k).scatter_add_(1, assign, ones)
            cents = torch.where(cnt[..., None] > 0, sums / cnt.clamp_min(1)[..., None], cents)
        assign = self._sqdist(keys, cents).argmin(-1)
        dist = _dist_to(keys, cents, assign)
        denom = keys.new_zeros(H, k).scatter_add_(1, assign, dist)
        if k < self.k:  # pad unused clusters far away so they never win an assignment
            pad = self.k - k
            cents = torch.cat([cents, cents.new_full((H, pad, D), 1e18)], 1)
            denom = torch.cat([denom, denom.new_ones(H, pad)], 1)
        return torch.cat([cents.reshape(H, self.k * D), denom], -1)

    def score(self, keys, state):
        D = keys.shape[-1]
        cents = state[..., : self.k * D].unflatten(-1, (self.k, D))  # [..., H, k, D]
        denom = state[..., self.k * D:]  # [..., H, k]
        d2 = ((keys * keys).sum(-1, keepdim=True) - 2 * keys @ cents.transpose(-1, -2)
              + (cents * cents).sum(-1).unsqueeze(-2))
        assign = d2.argmin(-1)
        return _outlier_ratio(_dist_to(keys, cents, assign), torch.gather(denom, -1, assign))


def _dist_to(keys, cents, assign):
    """Exact distance of each key to its assigned centroid (no |x|^2 - 2xc + |c|^2 cancellation)."""
    c = torch.gather(cents, -2, assign[..., None].expand(*assign.shape, cents.shape[-1]))
    return torch.linalg.vector_norm(keys - c, dim=-1)


def _outlier_ratio(dist, denom):
    """dist / (sum of distances in the cluster); a key alone at its centroid (0/0) scores 1, the limit of a
    cluster of one."""
    return torch.where(denom <= 1e-30, torch.ones_like(dist), dist / denom.clamp_min(1e-30))


def score_keys_at_fit(method: ScoringMethod, keys: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Scores of the keys a state was fitted on (exact leverage for the prompt)."""
    if isinstance(method, Leverage):
        return method.exact_scores(keys)
    return method.score(keys, state)


# ----------------------------------------------------------------------------------------------------------
# Per-block storage and the paged-cache side
# ----------------------------------------------------------------------------------------------------------

@dataclass
class BlockSummaries:
    """Per-physical-block metadata of one layer (see module doc)."""

    scores: torch.Tensor  # [NB, H] float32
    kmin: torch.Tensor  # [NB, H, D]
    kmax: torch.Tensor  # [NB, H, D]
    tags: torch.Tensor  # [NB] int64

    @classmethod
    def allocate(cls, num_blocks: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> "BlockSummaries":
        return cls(
            scores=torch.zeros(num_blocks, num_kv_heads, dtype=torch.float32, device=device),
            kmin=torch.zeros(num_blocks, num_kv_heads, head_size, dtype=dtype, device=device),
            kmax=torch.zeros(num_blocks, num_kv_heads, head_size, dtype=dtype, device=device),
            tags=torch.full((num_blocks,), -1, dtype=torch.int64, device=device),
        )

    @staticmethod
    def bytes_per_block(num_kv_heads: int, head_size: int, dtype: torch.dtype) -> int:
        el = torch.empty((), dtype=dtype).element_size()
        return num_kv_heads * 4 + 2 * num_kv_heads * head_size * el + 8


def key_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """[NB, H, BS, 2D] -> K view [NB, H, BS, D] (strided, no copy)."""
    return kv_cache[..., : kv_cache.shape[-1] // 2]


def gather_keys(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Keys of the given physical blocks: [n] -> [H, n * BS, D] (a copy)."""
    k = key_view(kv_cache)[block_ids.long()]  # [n, H, BS, D]
    n, H, BS, D = k.shape
    return k.permute(1, 0, 2, 3).reshape(H, n * BS, D)


def _write_blocks(summ: BlockSummaries, phys: torch.Tensor, kblk: torch.Tensor, valid: torch.Tensor,
                  key_scores: torch.Tensor, tag) -> None:
    """phys [n]; kblk [H, n, BS, D] float32; valid [n, BS] bool; key_scores [H, n, BS]."""
    neg = torch.finfo(torch.float32).min
    vmask = valid[None, :, :, None]
    kmin = torch.where(vmask, kblk, torch.inf).amin(2)  # [H, n, D]
    kmax = torch.where(vmask, kblk, -torch.inf).amax(2)
    sc = torch.where(valid[None], key_scores, neg).amax(-1)  # [H, n]
    summ.kmin[phys] = kmin.transpose(0, 1).to(summ.kmin.dtype)
    summ.kmax[phys] = kmax.transpose(0, 1).to(summ.kmax.dtype)
    summ.scores[phys] = sc.transpose(0, 1)
    summ.tags[phys] = tag


def score_prefill(kv_cache: torch.Tensor, summ: BlockSummaries, block_table_row: torch.Tensor, start: int,
                  end: int, method: ScoringMethod, tag: int, final: bool) -> torch.Tensor | None:
    """Score the blocks that the prefill chunk [start, end) of one sequence wrote (keys already in the cache).

    A non-final chunk scores its own blocks with the method's stateless proxy (key norm for stateful
    methods: no fitted state exists yet). The final chunk fits the method's state on every key of the prompt
    [0, end) and rescores every prompt block with it (prefix-cached blocks included). Returns the fitted state
    ``[H, S]`` on the final chunk, else None.
    """
    BS = kv_cache.shape[2]
    first_blk = 0 if final else start // BS
    last_blk = -(-end // BS)
    if last_blk <= first_blk:
        return None
    phys = block_table_row[first_blk:last_blk].long()
    n = phys.numel()
    keys = gather_keys(kv_cache, phys).float()  # [H, n*BS, D]
    H, _, D = keys.shape
    pos = first_blk * BS + torch.arange(n * BS, device=keys.device)
    valid = (pos < end).view(n, BS)
    state = None
    if final:
        nvalid = end - first_blk * BS
        state = method.fit(keys[:, :nvalid])
        ks = score_keys_at_fit(method, keys[:, :nvalid], state)
        ks = torch.cat([ks, ks.new_zeros(H, n * BS - nvalid)], 1)
    elif method.state_size(D) == 0:
        ks = method.score(keys, keys.new_zeros(H, 0))
    else:
        ks = KeyNorm().score(keys, None)
    _write_blocks(summ, phys, keys.view(H, n, BS, D), valid, ks.view(H, n, BS), tag)
    return state


def score_decode_tail(kv_cache: torch.Tensor, summ: BlockSummaries, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, method_ids: torch.Tensor, states: torch.Tensor,
                      tags: torch.Tensor, methods: dict[int, ScoringMethod]) -> None:
    """After a decode step wrote its token: rescore the block holding each row's newest token.

    Fixed shapes, no host sync (CUDA-graph friendly). ``block_table [B, MB]``, ``seq_lens [B]`` (the new token
    included), ``method_ids [B]`` int, ``states [B, H, S]`` (each row's fitted state; every method reads its own
    prefix of it), ``tags [B]`` int64. Rows with ``seq_lens == 0`` (padding) are skipped by writing to a block
    they own (their table's first entry) with unchanged content semantics.
    """
    B = seq_lens.shape[0]
    BS = kv_cache.shape[2]
    D = kv_cache.shape[-1] // 2
    last = (seq_lens.long() - 1).clamp_min(0)
    lblk = last // BS
    phys = torch.gather(block_table.long(), 1, lblk[:, None])[:, 0]  # [B]
    kblk = key_view(kv_cache)[phys].float()  # [B, H, BS, D]
    tok = torch.arange(BS, device=seq_lens.device)
    valid = (lblk[:, None] * BS + tok[None, :]) <= last[:, None]  # [B, BS]
    neg = torch.finfo(torch.float32).min
    scores = None
    for mid, m in methods.items():
        S = m.state_size(D)
        s = m.score(kblk, states[..., :S])  # [B, H, BS]
        scores = s if scores is None else torch.where((method_ids == mid)[:, None, None], s, scores)
    vm = valid[:, None, :, None]
    summ.kmin[phys] = torch.where(vm, kblk, torch.inf).amin(2).to(summ.kmin.dtype)
    summ.kmax[phys] = torch.where(vm, kblk, -torch.inf).amax(2).to(summ.kmax.dtype)
    summ.scores[phys] = torch.where(valid[:, None, :], scores, neg).amax(-1)
    summ.tags[phys] = tags


# ----------------------------------------------------------------------------------------------------------
# float64 references (loops, no batching tricks)
# ----------------------------------------------------------------------------------------------------------

def leverage_ref(keys: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """[H, T, D] -> [H, T] exact centred ridge leverage, float64, explicit inverse."""
    out = []
    for kh in keys.double():
        kc = kh - kh.mean(0)
        g = kc.T @ kc
        lam = ridge * torch.trace(g) / kh.shape[1]
        inv = torch.linalg.inv(g + lam * torch.eye(kh.shape[1], dtype=g.dtype))
        out.append(torch.einsum("td,de,te->t", kc, inv, kc))
    return torch.stack(out)


def kmeans_score_ref(keys: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[H, T, D], [H, k, D] -> [H, T]: distance to nearest centroid / sum of distances in that cluster."""
    out = []
    for kh, ch in zip(keys.double(), centroids.double()):
        d = torch.cdist(kh, ch)
        dist, a = d.min(1)
        denom = torch.zeros(ch.shape[0], dtype=torch.float64).index_add_(0, a, dist)[a]
        out.append(torch.where(denom <= 1e-9, torch.ones_like(dist), dist / denom.clamp_min(1e-30)))
    return torch.stack(out)


def block_scores_ref(key_scores: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[H, T] -> [H, ceil(T/BS)]: max over each block's valid keys."""
    H = key_scores.shape[0]
    nblk = -(-length // block_size)
    out = torch.empty(H, nblk, dtype=key_scores.dtype)
    for j in range(nblk):
        out[:, j] = key_scores[:, j * block_size:min(length, (j + 1) * block_size)].max(-1).values
    return out


__all__ = [
    "METHODS", "register_method", "get_method", "ScoringMethod", "KeyNorm", "Leverage", "KMeans",
    "BlockSummaries", "key_view", "gather_keys", "score_prefill", "score_decode_tail", "leverage_ref",
    "kmeans_score_ref", "block_scores_ref", "score_keys_at_fit",
]
