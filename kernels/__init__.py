"""prescore.kernels: pure torch + Triton (no vLLM import). Each kernel has a torch reference beside it.

- :mod:`.scoring`   query-independent block pre-scores (the method registry) + Quest min/max summaries
- :mod:`.selection` budgeted block selection per (request, KV head): prior / quest / hybrid
- :mod:`.decode`    paged sparse decode attention (Triton, split-K) over vLLM's paged KV layout
"""

from .decode import sparse_decode, sparse_decode_ref
from .scoring import (METHODS, BlockSummaries, ScoringMethod, Tile, get_method, register_method, score_decode_tail,
                      score_prefill)
from .selection import MODE_NAMES, MODES, Mode, Selection, SelectionCache, select_blocks, select_blocks_ref

__all__ = [
    "sparse_decode", "sparse_decode_ref", "METHODS", "BlockSummaries", "ScoringMethod", "get_method",
    "register_method", "score_decode_tail", "score_prefill", "Tile", "MODES", "MODE_NAMES", "Mode", "Selection",
    "select_blocks", "select_blocks_ref", "SelectionCache",
]
