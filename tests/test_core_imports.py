"""The backend's core (store, plan, step) is vLLM-free: the quality harness and the benchmarks import it without
vLLM; the platform modules import the core, never the other way round."""

import ast
import pathlib
import subprocess
import sys

CORE = ("store", "plan", "step")
BACKEND = pathlib.Path(__file__).resolve().parents[1] / "backend"


def test_core_imports_no_vllm():
    code = ("import sys; import prescore.backend.step, prescore.backend.plan, prescore.backend.store; "
            "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_never_imports_the_platform_modules():
    for name in CORE:
        tree = ast.parse((BACKEND / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                mods = [node.module] if node.module else [a.name for a in node.names]
                assert set(mods) <= set(CORE + ("metrics", "params", "compat")), (name, mods)
