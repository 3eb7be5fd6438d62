"""toolkit/bench.py, the `invoke bench` task's own checks, before any benchmark runs: each failure names its fix."""

from __future__ import annotations

import builtins

import pytest
from invoke import Context, Exit

from toolkit import bench as bench_task


def test_a_missing_demo_model_is_refused_with_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_task, "ROOT", tmp_path)  # a checkout without models/demo.onnx
    with pytest.raises(Exit) as refused:
        bench_task.bench(Context())
    assert "models/demo.onnx is missing" in refused.value.message
    assert "python scripts/make_demo_model.py" in refused.value.message


def test_without_the_dev_requirements_it_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_bench(name, *args, **kwargs):
        if name == "bench":
            raise ImportError("No module named 'litserve'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bench)
    with pytest.raises(Exit) as refused:
        bench_task.bench(Context())
    assert "cannot import the benchmarks (No module named 'litserve')" in refused.value.message
    assert "pip install -r requirements-dev.txt" in refused.value.message
