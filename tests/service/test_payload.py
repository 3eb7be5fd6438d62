"""The validation every protocol's codec shares (service/payload.py), called as the codecs call it."""

import numpy as np
import orjson
import pytest

from service.payload import BadRequest, decode_inputs, encode_outputs, json_to_array, to_tensor
from service.tensors import TensorSpec


def spec(ort_type: str, shape=("N",), name: str = "x") -> TensorSpec:
    return TensorSpec(name, f"tensor({ort_type})", tuple(shape))


@pytest.mark.parametrize(
    "ort_type, value, dtype",
    [
        ("float", [1, 2.5, -3e38], np.float32),
        ("double", [1e300], np.float64),
        ("float16", [65504.0, -1], np.float16),
        # Each fits though their squares add up past the float's limit squared: looked at one by one, kept.
        ("float", [3e38, -3e38, 1.5], np.float32),
        ("float16", [60000.0, 60000.0, 0.5], np.float16),
        ("int64", [2**63 - 1, -(2**63), 7.0], np.int64),
        ("uint64", [2**64 - 1, 0], np.uint64),
        ("int8", [-128, 127], np.int8),
        ("uint8", [0, 255.0], np.uint8),
        ("bool", [True, False], np.bool_),
        ("string", ["a", "", "ünïcode"], object),
    ],
)
def test_every_value_the_dtype_holds_is_kept_exactly(ort_type, value, dtype):
    array = json_to_array(value, spec(ort_type))
    assert array.dtype == np.dtype(dtype)
    assert array.tolist() == [dtype(v).item() if dtype is not object else v for v in value]


@pytest.mark.parametrize(
    "ort_type, value, fragments",
    [
        ("float", [1e39], ["'x' holds 1e+39", "outside the float32 range"]),
        ("float16", [65536], ["65536", "outside the float16 range"]),
        ("int64", [2**64], ["outside the int64 range"]),
        ("uint64", [-1], ["-1", "outside the uint64 range"]),
        ("int32", [2.5], ["fraction (such as 2.5)"]),
        ("float", [1, True], ["booleans"]),
        ("int64", [[1], [False]], ["booleans"]),
        ("bool", [1, 0], ["numbers", "true/false"]),
        ("string", ["a", 1], ["numbers", "JSON strings"]),
        ("string", [["a"], ["b", "c"]], ["uneven lengths"]),
        ("float", [[1.0], [2.0, 3.0]], ["uneven lengths"]),
        ("float", [1.0, None], ["null"]),
        ("float", {"a": 1}, ["objects"]),
        ("float", ["1.0"], ["strings"]),
    ],
)
def test_values_the_input_cannot_take_are_refused_naming_what_was_wrong(ort_type, value, fragments):
    with pytest.raises(BadRequest) as refused:
        json_to_array(value, spec(ort_type))
    assert refused.value.status == 422
    for fragment in ["input 'x'", *fragments]:
        assert fragment in str(refused.value)


def test_a_caller_that_knows_there_are_no_booleans_skips_the_search():
    # The codec of /predict passes False when the body has no true/false; numpy then reads a boolean as a number.
    assert json_to_array([1.0, True], spec("float"), may_hold_booleans=False).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("rows", [1, 100])  # a short body is searched for true/false, a long one hopped through
def test_a_boolean_among_the_numbers_of_a_predict_body_is_refused(rows):
    numbers = [[0.5, -1.0]] * rows
    body = orjson.dumps({"inputs": {"x": [*numbers, [1.0, True]]}})
    with pytest.raises(BadRequest, match="'x' holds booleans"):
        decode_inputs(body, [spec("float", ("N", 2))])
    assert decode_inputs(orjson.dumps({"inputs": {"x": numbers}}), [spec("float", ("N", 2))])["x"].shape == (rows, 2)


def test_rank_0_and_free_dimensions():
    assert to_tensor(2.5, spec("float", ())).shape == ()
    assert to_tensor([[[1.0] * 6] * 4], spec("float", (1, "?", "?"))).shape == (1, 4, 6)
    with pytest.raises(BadRequest, match="expected rank 0"):
        to_tensor([2.5], spec("float", ()))


def test_onnxruntime_refusing_an_input_becomes_a_4xx_naming_the_inputs(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from service.payload import rejected_by_model
    from tests.support.models import _save

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "add",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [dim]) for name, dim in (("a", "N"), ("b", "M"))],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N"])],
    )  # fmt: skip
    session = ort.InferenceSession(str(_save(graph, tmp_path / "add.onnx")), providers=["CPUExecutionProvider"])
    specs = (spec("float", ("N",), "a"), spec("float", ("M",), "b"))
    feeds = {"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}
    with pytest.raises(Exception) as failed:
        session.run(None, feeds)
    refusal = rejected_by_model(failed.value, specs, feeds)
    assert refusal.status == 422
    assert "inputs 'a' of shape [2], 'b' of shape [3]" in str(refusal) and "broadcast" in str(refusal)
    assert "onnxruntime_src" not in str(refusal)


@pytest.mark.parametrize("text", [b"-9223372036854775809", b"9223372036854775808", b"1e19", b"4.5e18"])
def test_an_integer_the_json_parser_can_only_read_as_an_inexact_float_is_refused(text):
    # orjson reads integers beyond 64 bits as floats: -2**63 - 1 would silently become -2**63.
    spec = TensorSpec("ids", "tensor(int64)", ("N", 2))
    with pytest.raises(BadRequest) as raised:
        decode_inputs(b'{"inputs": [[' + text + b", 0]]}", [spec])
    assert "'ids'" in str(raised.value) and ("write it as an integer" in str(raised.value) or "range" in str(raised.value))


# --- dimensions the model names alike (issue 16) ----------------------------------------------------------------

SHARED = (spec("float", ("N", 3), "feat"), spec("int64", ("N",), "count"))


def test_inputs_sharing_a_named_dimension_must_agree_on_its_size():
    body = b'{"inputs": {"feat": [[1, 2, 3]], "count": [1, 2, 3]}}'
    with pytest.raises(BadRequest) as refused:
        decode_inputs(body, SHARED)
    assert refused.value.status == 422
    assert str(refused.value) == (
        "inputs 'feat' and 'count' share dimension 'N' but have sizes 1 and 3 (shapes [1, 3] and [3]); "
        "send them with the same size in 'N'"
    )
    agreeing = decode_inputs(b'{"inputs": {"feat": [[1, 2, 3], [4, 5, 6]], "count": [1, 2]}}', SHARED)
    assert agreeing["count"].shape == (2,)
    assert decode_inputs(body, SHARED, shared_dims=False)["count"].shape == (3,)  # CHECK_SHARED_DIMS=false


def test_two_dimensions_of_one_input_named_alike_must_agree():
    square = [spec("float", ("side", "side"), "m")]
    assert decode_inputs(b'{"inputs": [[1, 2], [3, 4]]}', square)["m"].shape == (2, 2)
    with pytest.raises(BadRequest, match=r"input 'm' has shape \[1, 2\], whose dimensions 0 and 1 the model names "
                                         r"both 'side'"):
        decode_inputs(b'{"inputs": [[1, 2]]}', square)


@pytest.mark.parametrize("name", ["?", "", None, "-1", "batch size", "unk-1"])
def test_names_exporters_use_for_unknown_are_not_shared(name):
    specs = (spec("float", (name, 3), "feat"), spec("int64", (name,), "count"))
    tensors = decode_inputs(b'{"inputs": {"feat": [[1, 2, 3]], "count": [1, 2, 3]}}', specs)
    assert tensors["count"].shape == (3,)


def test_the_v2_codec_applies_the_same_rule():
    from service.v2 import decode_request

    body = orjson.dumps({"inputs": [
        {"name": "feat", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
        {"name": "count", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]},
    ]})  # fmt: skip
    with pytest.raises(BadRequest, match="'feat' and 'count' share dimension 'N' but have sizes 1 and 3"):
        decode_request(body, None, SHARED, ())
    assert decode_request(body, None, SHARED, (), shared_dims=False).feeds["count"].shape == (3,)


# The usual request (a few rows of numbers for a float input) takes a shorter path (`_plain_numbers`); it must
# give the very array the general one gives, and leave every other value to it.
PLAIN_CASES = [
    ("float", [[0.1, -2.5, 3.0, 1e-40]]),
    ("float", [[1, 2], [3, 4.5]]),
    ("float", [2**53 - 1, -(2**53) + 1, 0.1]),
    ("float16", [[65519.0, -0.1, 1e-8]]),
    ("double", [[1e300, -1e-300, 7]]),
]


@pytest.mark.parametrize("booleans", [True, False], ids=["may hold booleans", "no true or false in the body"])
@pytest.mark.parametrize("ort_type, value", PLAIN_CASES)
def test_the_short_path_gives_the_general_paths_array(ort_type, value, booleans):
    from service import payload

    got = payload._plain_numbers(value, spec(ort_type).dtype, booleans)
    general = payload._json_to_array(value, spec(ort_type), True)
    assert got is not None, "the short path should take this value"
    assert got.dtype == general.dtype and got.shape == general.shape
    assert got.tobytes() == general.tobytes()  # bit for bit, signs of zero and rounding included


@pytest.mark.parametrize(
    "ort_type, value",
    [
        ("float", [[1.0, True]]),  # a boolean
        ("float", [[1.0, "2"]]),  # a string
        ("float", [[1.0, None]]),  # null
        ("float", [[1.0, 2.0], [3.0]]),  # uneven rows
        ("float", [[1.0], 2.0]),  # a number beside a row
        ("float", [[[1.0]]]),  # rank 3: the general path
        ("float", [[]]),  # no values
        ("float", [2**53]),  # an integer a float32 might round differently through float64
        ("float", [1e39]),  # above 2**53 (the general path refuses it: past float32's range)
        ("float16", [[65520.0]]),  # rounds to infinity in float16
        ("float", [0.5] * 65),  # more than PLAIN_VALUES
        ("int64", [[1, 2]]),  # not a float input
        ("string", [["a"]]),
    ],
)
def test_the_short_path_leaves_everything_else_to_the_general_one(ort_type, value):
    from service import payload

    assert payload._plain_numbers(value, spec(ort_type).dtype) is None
    row = value[0] if value and isinstance(value[0], list) else value
    if bool not in map(type, row):  # (without booleans in the body, the caller says so, and the pass is another)
        assert payload._plain_numbers(value, spec(ort_type).dtype, False) is None


@pytest.mark.parametrize(
    "value, message",
    [
        ([[1.0, 2.0, 3.0]], "dimension 1 must be 2"),
        ([1.0, 2.0], "has rank 1"),
        ([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], None),  # rows: free
    ],
)
def test_the_short_path_checks_the_shape_on_the_lists_and_leaves_a_wrong_one_to_the_general_path(value, message):
    from service import payload

    input_spec = spec("float", ("N", 2))
    taken = payload._plain_numbers(value, input_spec.dtype, False, input_spec)
    body = orjson.dumps({"inputs": {"x": value}})
    if message is None:
        assert taken is not None and taken.shape == (3, 2)
        assert decode_inputs(body, [input_spec])["x"].shape == (3, 2)
    else:
        assert taken is None  # the general path refuses it, naming what is wrong
        with pytest.raises(BadRequest, match=message):
            decode_inputs(body, [input_spec])


@pytest.mark.parametrize("value, message", [
    ([[1.0, True]], "holds booleans"),
    ([[1.0, "2"]], "holds strings"),
    ([[1.0, 2.0], [3.0]], "uneven lengths"),
    ([[1e39, 1.0]], "outside the float32 range"),
])  # fmt: skip
def test_a_predict_body_the_short_path_leaves_is_refused_as_before(value, message):
    body = orjson.dumps({"inputs": {"x": value}})
    with pytest.raises(BadRequest, match=message):
        decode_inputs(body, [spec("float", ("N", 2))])


@pytest.mark.parametrize("value", [[[4294967296]], [[4294967296, 4294967296]], [[65520]]])
def test_integers_past_float16s_range_are_refused_not_turned_into_infinity(value):
    with pytest.raises(BadRequest, match="outside the float16 range"):
        json_to_array(value, spec("float16", ("N", "?")))


def test_names_are_checked_before_any_value():
    two = [spec("float", ("N", 2), "a"), spec("float", ("N", 2), "b")]
    with pytest.raises(BadRequest, match="unknown input 'c'"):  # not "input 'a' holds strings"
        decode_inputs(orjson.dumps({"inputs": {"a": [["s", 1.0]], "c": [[1.0, 2.0]]}}), two)


def test_outputs_are_encoded_as_json_whatever_their_kind():
    """Arrays in their dtype's shortest form, skl2onnx's maps keyed by class numbers with string keys (JSON has no
    others), string arrays as plain JSON: each kind takes its own encoding path (orjson's numpy support, then its
    non-string keys, then plain Python values)."""
    probabilities = np.array([[0.1, 0.9]], dtype=np.float32)
    arrays = orjson.loads(encode_outputs([spec("float", name="p")], [probabilities]))
    assert arrays == {"outputs": {"p": [[0.1, 0.9]]}}  # float32 0.1, not 0.10000000149011612
    maps = [{0: 0.25, 1: 0.75}]
    mixed = encode_outputs([spec("int64", name="label"), spec("float", name="p"), spec("float", name="zipmap")],
                           [np.array([1]), probabilities, maps])  # fmt: skip
    assert orjson.loads(mixed) == {"outputs": {"label": [1], "p": [[0.1, 0.9]], "zipmap": [{"0": 0.25, "1": 0.75}]}}
    plain = encode_outputs([spec("string", name="s"), spec("float", (), name="r")],
                           [np.array(["a", "b"], dtype=object), np.array(0.5, dtype=np.float32)])  # fmt: skip
    assert orjson.loads(plain) == {"outputs": {"s": ["a", "b"], "r": 0.5}}
