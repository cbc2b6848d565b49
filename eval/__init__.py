"""prescore.eval: quality of sparse decode at a fixed key budget on real pretrained models.

A transformers model whose attention, in decode mode, runs prescore's own scoring / selection / paged sparse
decode (:mod:`.engine`); tasks (decode-mode perplexity, passkey retrieval, per-layer attention fidelity) in
:mod:`.tasks`; the ``prescore-eval`` command in :mod:`.cli`. See results/QUALITY.md.
"""
