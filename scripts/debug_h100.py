#!/usr/bin/env python3
"""Diagnostics on a GPU: two long prompts prefilled in several chunks, then sparse decode, with
the config's ``debug`` on (builder paths, first layer's prefill scoring and selections in eager mode); prints the
prescore counters and decode step times for budget 512 vs dense (budget 0).

    python3 scripts/debug_h100.py [--graphs]
"""
import os
import random
import sys
import time

os.environ.setdefault("PRESCORE_METRICS_DIR", f"/tmp/psm-debug-{os.getpid()}")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from vllm import LLM, SamplingParams  # noqa: E402

graphs = "--graphs" in sys.argv
llm = LLM(model="/tmp/llama3-8b-dummy", load_format="dummy", dtype="bfloat16", max_model_len=32768,
          enforce_eager=not graphs, enable_prefix_caching=False, gpu_memory_utilization=0.6,
          attention_backend="PRESCORE", max_num_seqs=8, max_num_batched_tokens=4096,
          additional_config={"prescore": {"debug": True}})
rng = random.Random(0)
prompts = [{"prompt_token_ids": [rng.randrange(0, 100000) for _ in range(n)]} for n in [16000] * 4]
for budget in (512, 0, 512):
    def t(n):
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                            extra_args={"prescore_budget": budget, "prescore_mode": "prior"})
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t0
    t1, tn = t(1), t(33)
    print(f"STEP budget={budget} graphs={graphs}: {(tn - t1) / 32 * 1e3:.2f} ms/step, prefill {t1:.2f} s", flush=True)
from prescore.backend import metrics  # noqa: E402

metrics.dump()
print("METRICS", metrics.read_dir(os.environ["PRESCORE_METRICS_DIR"]), flush=True)
