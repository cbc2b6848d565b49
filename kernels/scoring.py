"""Query-independent block pre-scoring over the paged KV cache.

Scoring methods are small registered dataclasses (``@register_method``: ``name``, parameters as fields, the
``tile`` of the Triton tail kernel that scores their keys on the CUDA decode path); the registry is the one list
of methods that the backend, the HTTP schema, the quality harness and the tests derive theirs from. One shape
contract:

- ``fit(keys)``: ``keys`` ``[H, T, D]`` float32 (one sequence, one layer, all KV heads) -> ``state``
  ``[H, S]`` float32 with ``S = state_size(D)`` (0 for stateless methods). Called once per (sequence, layer)
  at the end of its prefill.
- ``score(keys, state)``: ``keys`` ``[..., H, N, D]`` float32, ``state`` ``[..., H, S]`` -> ``[..., H, N]``
  float32, higher = more important. Pure function of the key and the fitted state (never of the query).
- ``fit_and_score(keys)``: both at once for the prompt's own keys.

A block's score is the maximum of its valid keys' scores (an outlier key makes its block worth keeping).
Alongside, each block gets per-channel key min/max summaries (Quest) for query-aware selection.

Per-block storage lives in :class:`BlockSummaries` (indexed by PHYSICAL block id, one per layer):
``scores [num_blocks, H]`` f32, ``kmin``/``kmax`` ``[num_blocks, H, D]`` (cache dtype), ``tags [num_blocks]``
int64 = the id of the request that scored the block. Selection treats a block whose tag is not the reading
request's as must-attend, so a freed-and-reused or prefix-shared block never contributes a stale score.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, is_dataclass
from typing import ClassVar

import torch
import triton.language as tl

from .summarize import summarize


class Tile(enum.IntEnum):
    """The scoring tiles of the Triton tail kernel (:func:`.step_triton.score_tail_triton`): a method names the
    tile that scores its keys from its own state layout (``None``: no Triton tile; the CUDA engine refuses to
    start while such a method is registered, :func:`.step_triton.tail_tiles`)."""

    KEYNORM = 0  # L2 norm of the key (stateless)
    LEVERAGE = 1  # (k - mu)^T A^-1 (k - mu); state = mu [D] then A^-1 [D, D] row-major
    KMEANS = 2  # distance to the nearest centroid / sum of distances in its cluster; state = k centroids, k sums


# the same integers as Triton constants (the tail kernel's constexpr dispatch compares with these)
TILE_KEYNORM, TILE_LEVERAGE, TILE_KMEANS = (tl.constexpr(int(t)) for t in Tile)

METHODS: dict[str, type["ScoringMethod"]] = {}


def register_method(cls):
    """Register a scoring method: a :class:`ScoringMethod` subclass with a unique ``name`` and a ``tile``
    (made a dataclass here; its fields are the method's parameters, defaults = what the backend runs). The
    registry is the one list of methods: the backend's request fields and per-method summaries, the HTTP
    schema, the quality harness and the tests derive theirs from it (register before ``prescore.backend`` is
    imported). ``method_id`` (registration order) is what the kernels' per-row method tensors hold."""
    if not (isinstance(cls, type) and issubclass(cls, ScoringMethod)):
        raise TypeError(f"register_method: {cls!r} is not a ScoringMethod subclass")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"scoring method {cls.__name__} needs its own name")
    if name in METHODS:
        raise ValueError(f"scoring method {name!r} already registered")
    if cls.tile is not None and not isinstance(cls.tile, Tile):
        raise ValueError(f"scoring method {name!r}: tile must be a Tile or None, got {cls.tile!r}")
    if not (is_dataclass(cls) and "__dataclass_fields__" in cls.__dict__):
        cls = dataclass(cls)
    METHODS[name] = cls
    cls.method_id = len(METHODS) - 1
    return cls


def get_method(name: str, **kwargs) -> "ScoringMethod":
    try:
        return METHODS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown scoring method {name!r}; choose one of {sorted(METHODS)}") from None


class ScoringMethod:
    """One scoring method (see the module doc for the shape contract). ``name``: how requests, tables and
    metrics call it; ``tile``: the Triton tail kernel's tile that scores its keys on the CUDA decode path."""

    name: ClassVar[str]
    tile: ClassVar[Tile | None] = None
    method_id: ClassVar[int]

    def state_size(self, head_size: int) -> int:
        return 0

    def fit(self, keys: torch.Tensor) -> torch.Tensor:
        return keys.new_zeros(keys.shape[0], 0)

    def score(self, keys: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit_and_score(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``fit`` then ``score`` of the same keys (methods override it to share work): ([H, S], [H, T])."""
        state = self.fit(keys)
        return state, self.score(keys, state)

    def fit_and_score_paged(self, kv_cache: torch.Tensor, phys: torch.Tensor, T: int, use_triton: bool,
                            summ=None, tag: int = 0):
        """The same for tokens [0, T) of the sequence held in physical blocks ``phys`` of the paged cache.
        A method may write the blocks' summaries itself (given ``summ`` and ``tag``) and return None scores."""
        return self.fit_and_score(_paged_keys(kv_cache, phys, T, use_triton))


def _paged_keys(kv_cache, phys, T, use_triton):
    """[H, T, D] keys of tokens [0, T) held in ``phys`` (cache dtype, a copy)."""
    if use_triton:
        from .summarize import gather_keys_triton

        return gather_keys_triton(kv_cache, phys, T)
    return gather_keys(kv_cache, phys)[:, :T]


def _norm_scored(m: ScoringMethod) -> bool:
    """Whether the method's key score is the key norm (what ``summarize`` computes when given no scores)."""
    return type(m).score is KeyNorm.score


@register_method
class KeyNorm(ScoringMethod):
    """Score = L2 norm of the key. Stateless."""

    name = "keynorm"
    tile = Tile.KEYNORM

    def score(self, keys, state):
        return torch.linalg.vector_norm(keys, dim=-1)


@register_method
class Leverage(ScoringMethod):
    """Ridge leverage of the centred key: l_i = (k_i - mu)^T (K_c^T K_c + lam I)^-1 (k_i - mu).

    ``lam = ridge * trace(K_c^T K_c) / D``; K_c are the prompt's keys minus their mean ``mu`` (per KV head),
    ``K_c^T K_c = K^T K - T mu mu^T``. State: ``mu`` and ``A^-1 = (K_c^T K_c + lam I)^-1``, ``S = D + D * D``
    floats per KV head; the prompt's own keys are scored with the same exact formula. On CUDA (D <= 128) the
    fit and the scores are Triton launches over the paged cache (:mod:`.leverage_triton`), then the usual
    summarize pass; elsewhere torch computes the same in float64 for the D x D algebra.
    """

    name = "leverage"
    tile = Tile.LEVERAGE
    ridge: float = 1e-2
    use_triton: bool | None = None  # None: Triton on CUDA tensors, torch otherwise

    def state_size(self, head_size):
        return head_size + head_size * head_size

    def _ainv(self, gram):
        D = gram.shape[-1]
        lam = self.ridge * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-12) / D
        return gram + lam[:, None, None] * torch.eye(D, device=gram.device, dtype=gram.dtype)

    def fit_and_score(self, keys):
        """Reference path (torch; the D x D algebra in float64)."""
        H, T, D = keys.shape
        mu = keys.mean(1, dtype=torch.float32)
        kc = (keys - mu[:, None, :]).double()
        ainv = torch.linalg.inv(self._ainv(kc.transpose(1, 2) @ kc))
        scores = ((kc @ ainv) * kc).sum(-1).float()
        return torch.cat([mu, ainv.float().reshape(H, D * D)], -1), scores

    def fit_and_score_paged(self, kv_cache, phys, T, use_triton, summ=None, tag=0):
        if not (use_triton if self.use_triton is None else self.use_triton) or kv_cache.shape[-1] > 256:
            return super().fit_and_score_paged(kv_cache, phys, T, use_triton)
        from .leverage_triton import fit_and_score_triton

        # Gram partials, reduce, inverse, scores: four launches, no host sync
        return fit_and_score_triton(kv_cache, phys, T, self.ridge)

    def fit(self, keys):
        return self.fit_and_score(keys)[0]

    def score(self, keys, state):
        D = keys.shape[-1]
        mu = state[..., :D]
        ainv = state[..., D:].unflatten(-1, (D, D))
        x = keys.float() - mu.unsqueeze(-2)
        with _tf32():
            y = x @ ainv
        return (x * y).sum(-1)


@register_method
class KMeans(ScoringMethod):
    """The paper's outlier score: per-sequence, per-KV-head k-means (k-means++ init + Lloyd iterations).

    Key score = distance to its centroid / sum of those distances in its cluster (keys of small or spread
    clusters score high; a key alone in its cluster scores 1). The k-means++ init draws D^2-weighted samples
    with the Gumbel-max trick on a random subsample of ``init_sample`` keys (one Triton program per KV head on
    GPU). State: centroids and per-cluster distance sums, ``S = k * D + k`` per KV head.
    """

    name = "kmeans"
    tile = Tile.KMEANS
    k: int = 32
    iters: int = 5
    init_sample: int = 256
    seed: int = 0
    use_triton: bool | None = None  # None: Triton on CUDA tensors, torch otherwise

    def state_size(self, head_size):
        return self.k * head_size + self.k

    def init_centroids(self, sample: torch.Tensor, k: int, gen: torch.Generator, use_triton: bool | None = None):
        """k-means++ on ``sample [H, N, D]`` -> ``[H, k, D]`` float32."""
        H, N, D = sample.shape
        idx0 = torch.randint(0, N, (H,), device=sample.device, generator=gen)
        gumbel = torch.empty(k, H, N, device=sample.device).exponential_(generator=gen).log_().neg_()
        if use_triton is None:
            use_triton = sample.is_cuda
        if use_triton:
            from .kmeans_triton import kmeanspp_triton

            return kmeanspp_triton(sample, idx0, gumbel, k)
        x = sample.float()
        ar = torch.arange(H, device=x.device)
        cents = [x[ar, idx0]]
        d2 = torch.full((H, N), float("inf"), device=x.device)
        for j in range(1, k):
            d2 = torch.minimum(d2, ((x - cents[-1][:, None]) ** 2).sum(-1))
            cents.append(x[ar, (torch.log(d2.clamp_min(1e-30)) + gumbel[j]).argmax(-1)])
        return torch.stack(cents, 1)

    def fit_and_score(self, keys):
        H, T, D = keys.shape
        k = min(self.k, T)
        gen = torch.Generator(device=keys.device)
        gen.manual_seed(self.seed)
        sample = keys
        if T > self.init_sample:  # a uniform sample (with replacement: duplicates are harmless to D^2 seeding)
            sample = keys[:, torch.randint(0, T, (self.init_sample,), device=keys.device, generator=gen)]
        tri = keys.is_cuda if self.use_triton is None else self.use_triton
        cents = self.init_centroids(sample.contiguous(), k, gen, use_triton=tri)
        if tri:
            from .kmeans_triton import lloyd_triton

            cents, assign, dist = lloyd_triton(keys, cents, self.iters)
            return self._finish(cents, assign, dist)
        x = keys.float()
        xx = (x * x).sum(-1, keepdim=True)
        ks = torch.arange(k, device=x.device)
        for _ in range(self.iters):
            onehot = (_assign(x, xx, cents)[..., None] == ks).float()  # [H, T, k]
            with _tf32():
                sums = onehot.transpose(1, 2) @ x
            cnt = onehot.sum(1)
            cents = torch.where(cnt[..., None] > 0, sums / cnt.clamp_min(1)[..., None], cents)
        assign = _assign(x, xx, cents)
        return self._finish(cents, assign, _dist_to(x, cents, assign))

    def _finish(self, cents, assign, dist):
        H, k, D = cents.shape
        denom = dist.new_zeros(H, k).scatter_add_(1, assign, dist)
        scores = _outlier_ratio(dist, torch.gather(denom, 1, assign))
        if k < self.k:  # pad unused clusters far away so they never win an assignment
            pad = self.k - k
            cents = torch.cat([cents, cents.new_full((H, pad, D), 1e18)], 1)
            denom = torch.cat([denom, denom.new_ones(H, pad)], 1)
        return torch.cat([cents.reshape(H, self.k * D), denom], -1), scores

    def fit(self, keys):
        return self.fit_and_score(keys)[0]

    def score(self, keys, state):
        D = keys.shape[-1]
        cents = state[..., : self.k * D].unflatten(-1, (self.k, D))  # [..., H, k, D]
        denom = state[..., self.k * D:]  # [..., H, k]
        x = keys.float()
        assign = _assign(x, (x * x).sum(-1, keepdim=True), cents)
        return _outlier_ratio(_dist_to(x, cents, assign), torch.gather(denom, -1, assign))


def _assign(x, xx, cents):
    with _tf32():
        xc = x @ cents.transpose(-1, -2)
    return (xx - 2 * xc + (cents * cents).sum(-1).unsqueeze(-2)).argmin(-1)


def _dist_to(keys, cents, assign):
    """Exact distance of each key to its assigned centroid (no |x|^2 - 2xc + |c|^2 cancellation)."""
    c = torch.gather(cents, -2, assign[..., None].expand(*assign.shape, cents.shape[-1]))
    return torch.linalg.vector_norm(keys - c, dim=-1)


def _outlier_ratio(dist, denom):
    """dist / (sum of distances in the cluster); a key alone at its centroid (0/0) scores 1, the limit of a
    cluster of one."""
    return torch.where(denom <= 1e-30, torch.ones_like(dist), dist / denom.clamp_min(1e-30))


def _bmm_f32(a, b):
    """bf16/fp16 batched product with a float32 result (fp32 accumulation)."""
    try:
        return torch.bmm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        with _tf32():
            return torch.bmm(a.float(), b.float())


@contextlib.contextmanager
def _tf32():
    """TF32 for the fp32 matmuls of scoring on CUDA (a ranking prior: 1e-3 relative error is harmless)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


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


def key_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """[NB, H, BS, 2D] -> K view [NB, H, BS, D] (strided, no copy)."""
    return kv_cache[..., : kv_cache.shape[-1] // 2]


def gather_keys(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Keys of the given physical blocks: [n] -> [H, n * BS, D] (a copy)."""
    k = key_view(kv_cache)[block_ids.long()]  # [n, H, BS, D]
    n, H, BS, D = k.shape
    return k.permute(1, 0, 2, 3).reshape(H, n * BS, D)


def score_prefill(kv_cache: torch.Tensor, summ: BlockSummaries, block_table_row: torch.Tensor, start: int,
                  end: int, method: ScoringMethod, tag: int, final: bool,
                  use_triton: bool | None = None) -> torch.Tensor | None:
    """Score the blocks that the prefill chunk [start, end) of one sequence wrote (keys already in the cache).

    A non-final chunk summarises its own blocks, scored by the method if it is stateless, else by the key norm
    (no fitted state exists yet). The final chunk fits the method's state on every key of the prompt [0, end)
    and rescores every prompt block with it (prefix-cached blocks included). Returns the fitted state
    ``[H, S]`` on the final chunk, else None.
    """
    BS = kv_cache.shape[2]
    first_blk = 0 if final else start // BS
    last_blk = -(-end // BS)
    if last_blk <= first_blk:
        return None
    phys = block_table_row[first_blk:last_blk]
    n = phys.numel()
    H, D = kv_cache.shape[1], kv_cache.shape[-1] // 2
    if use_triton is None:
        use_triton = kv_cache.is_cuda
    nv = end - first_blk * BS  # valid tokens from the first block's start
    state = ks = None
    if final and method.state_size(D) > 0:
        state, ks = method.fit_and_score_paged(kv_cache, phys, nv, use_triton, summ, int(tag))
        if ks is None:
            return state
    else:
        state = kv_cache.new_zeros(H, 0, dtype=torch.float32)
        if method.state_size(D) == 0 and not _norm_scored(method):  # a stateless score of its own
            ks = method.score(_paged_keys(kv_cache, phys, nv, use_triton).float(), state)
        state = state if final else None
    if ks is not None:
        if ks.stride(0) == n * BS and ks.stride(1) == 1:  # block-padded rows (Triton leverage): a view
            ks = ks.as_strided((n, H, BS), (BS, n * BS, 1))
        else:
            ks = torch.nn.functional.pad(ks, (0, n * BS - nv)).view(H, n, BS).transpose(0, 1)  # [n, H, BS]
    summarize(kv_cache, summ, phys, nv, int(tag), ks, use_triton)
    return state


def score_decode_tail(kv_cache: torch.Tensor, summ: BlockSummaries, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, method_ids: torch.Tensor, states: torch.Tensor,
                      tags: torch.Tensor, methods: dict[int, ScoringMethod], use_triton: bool | None = None) -> None:
    """After a decode step wrote its token: rescore the block holding each row's newest token.

    Fixed shapes, no host sync (CUDA-graph friendly). ``block_table [B, MB]``, ``seq_lens [B]`` (the new token
    included; rows with 0 are padding and are skipped), ``method_ids [B]`` int, ``states [B, H, S]`` (each row's
    fitted state; every method reads its own prefix of it), ``tags [B]`` int64.
    """
    BS = kv_cache.shape[2]
    D = kv_cache.shape[-1] // 2
    seq = seq_lens.long()
    last = (seq - 1).clamp_min(0)
    lblk = last // BS
    phys = torch.gather(block_table.long(), 1, lblk[:, None])[:, 0]  # [B]
    nvalid = (last - lblk * BS + 1).to(torch.int32)
    ks = None
    own = {mid: m for mid, m in methods.items() if not _norm_scored(m)}  # else summarize's key norm
    if own:
        kblk = key_view(kv_cache)[phys].float()  # [B, H, BS, D]
        ks = torch.linalg.vector_norm(kblk, dim=-1)
        for mid, m in own.items():
            s = m.score(kblk, states[..., : m.state_size(D)])
            ks = torch.where((method_ids == mid)[:, None, None], s, ks)
    nvalid = torch.where(seq > 0, nvalid, torch.zeros_like(nvalid))  # 0 valid tokens: the item writes nothing
    summarize(kv_cache, summ, phys, nvalid, tags, ks, use_triton)


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
    "kmeans_score_ref", "block_scores_ref",
]
