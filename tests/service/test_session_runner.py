"""The request path's call into onnxruntime (service/model_store.py `session_runner`): the C++ session's own `run`
where it gives what `session.run(None, feeds)` gives, the Python wrapper everywhere else."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from service.model_store import ModelStore, session_runner
from service.settings import load_settings
from tests.support.models import dtypes_model, linear_model, two_input_model

FEEDS = {
    "linear": lambda rows: {"features": np.random.default_rng(rows).standard_normal((rows, 4), dtype=np.float32)},
    "two inputs": lambda rows: {"ids": np.arange(rows * 3, dtype=np.int64).reshape(rows, 3),
                                "scale": np.full((rows, 1), 0.5, np.float32)},  # fmt: skip
    "dtypes": lambda rows: {"flag": np.ones(rows, bool), "small": np.full((rows, 2), -3, np.int8),
                            "big": np.array([2**64 - 1, 0], np.uint64), "half": np.full(rows, 0.25, np.float16),
                            "scalar": np.array(1.5, np.float32)},  # fmt: skip
}
MODELS = {"linear": linear_model, "two inputs": two_input_model, "dtypes": dtypes_model}


@pytest.mark.parametrize("kind", MODELS)
def test_the_direct_run_answers_bit_for_bit_what_session_run_does(kind, tmp_path):
    path = MODELS[kind](tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run, names = session_runner(session, FEEDS[kind](1))
    assert run is not session.run and names == [o.name for o in session.get_outputs()]  # the C++ session's
    for rows in (1, 3, 17):
        feeds = FEEDS[kind](rows)
        got, expected = run(names, feeds, None), session.run(None, feeds)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_the_direct_run_refuses_what_session_run_refuses(tmp_path):
    """A wrong dimension: onnxruntime's own refusal, the same error either way (the codecs turn it into a 4xx)."""
    session = ort.InferenceSession(str(linear_model(tmp_path / "model.onnx")), providers=["CPUExecutionProvider"])
    run, names = session_runner(session, FEEDS["linear"](1))
    bad = {"features": np.ones((2, 5), np.float32)}
    with pytest.raises(Exception) as direct:
        run(names, bad, None)
    with pytest.raises(Exception) as wrapper:
        session.run(None, bad)
    assert type(direct.value) is type(wrapper.value) and str(direct.value) == str(wrapper.value)
    assert "features" in str(direct.value)


class _WithoutCppSession:
    """An onnxruntime whose session has no `_sess` (the attribute is not a public one): the wrapper is used."""

    def __init__(self, session: ort.InferenceSession):
        self.run, self.get_outputs, self.get_providers = session.run, session.get_outputs, session.get_providers


def test_the_wrapper_is_used_without_a_cpp_session_or_an_example_to_check_it_with(tmp_path):
    session = ort.InferenceSession(str(linear_model(tmp_path / "model.onnx")), providers=["CPUExecutionProvider"])
    example = FEEDS["linear"](1)
    for given, feeds in ((_WithoutCppSession(session), example), (session, None)):
        run, names = session_runner(given, feeds)
        assert (run, names) == (given.run, None)
        assert run(names, example, None)[0].tobytes() == session.run(None, example)[0].tobytes()


def test_the_model_store_runs_the_loaded_model_through_it(tmp_path):
    path = linear_model(tmp_path / "model.onnx")
    store = ModelStore(load_settings({"MODEL_URI": str(path)}))
    with pytest.raises(RuntimeError, match="before the model is ready"):
        store.run(FEEDS["linear"](1))
    store.load()
    assert store.ready and store._run is not store.session.run  # the warm-up's input checked the direct run
    feeds = FEEDS["linear"](5)
    assert store.run(feeds)[0].tobytes() == store.session.run(None, feeds)[0].tobytes()
