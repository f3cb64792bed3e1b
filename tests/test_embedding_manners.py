"""An embedded library's manners: no process-wide settings changed behind the caller's back, no
print in library code (logging through named loggers)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import biref_sdk


def test_the_model_reconstructor_leaves_torchs_thread_count_to_the_program():
    torch = pytest.importorskip("torch")
    from biref_sdk.reconstruction.model import ModelReconstructor

    before = torch.get_num_threads()
    for engine in ("torch", "onnxruntime"):
        if engine == "onnxruntime":
            pytest.importorskip("onnxruntime")
        ModelReconstructor(threads=before + 1, engine=engine, quarter_turns=False)
        assert torch.get_num_threads() == before


def test_library_code_never_prints():
    root = Path(biref_sdk.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "cli" in path.relative_to(root).parts:
            continue   # the command-line program may print its output
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "print_exc":
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
