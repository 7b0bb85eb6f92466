"""The fake TensorRT module (fake_tensorrt.py) held to TensorRT's documented contract, without embedq.

A tiny ONNX graph with embedq's interface (input_ids int32 (batch, sequence), lengths int32 (batch,) ->
embeddings float32 (batch, dim): a masked mean over an embedding table) is built with two profiles, then run
the documented way and every documented way wrong.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from . import fake_tensorrt as trt

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

VOCAB, DIM = 50, 8
# (min, opt, max) of input_ids per profile; lengths takes the batch dimension of each.
PROFILES = [((1, 1), (4, 8), (8, 16)), ((1, 17), (8, 32), (16, 64))]
STREAM = 7  # any int stands for a cudaStream_t here
NAMES = ["input_ids", "lengths", "embeddings"]


def tiny_embedder() -> bytes:
    """A masked mean of token embeddings, in 12 ONNX nodes."""
    helper, numpy_helper, types = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    table = np.random.default_rng(0).standard_normal((VOCAB, DIM)).astype(np.float32)
    constants = {"table": table, "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
                 "axis1": np.array([1], np.int64), "axis2": np.array([2], np.int64)}
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),  # (batch, sequence, dim)
        helper.make_node("Shape", ["input_ids"], ["width"], start=1, end=2),
        helper.make_node("Squeeze", ["width"], ["sequence"]),
        helper.make_node("Range", ["zero", "sequence", "one"], ["positions"]),
        helper.make_node("Cast", ["lengths"], ["lengths64"], to=types.INT64),
        helper.make_node("Unsqueeze", ["lengths64", "axis1"], ["limits"]),  # (batch, 1)
        helper.make_node("Less", ["positions", "limits"], ["mask"]),  # (batch, sequence)
        helper.make_node("Cast", ["mask"], ["weights"], to=types.FLOAT),
        helper.make_node("Unsqueeze", ["weights", "axis2"], ["weights3"]),
        helper.make_node("Mul", ["tokens", "weights3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["sums"], keepdims=0),
        helper.make_node("Cast", ["limits"], ["counts"], to=types.FLOAT),
        helper.make_node("Div", ["sums", "counts"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_embedder",
        [helper.make_tensor_value_info("input_ids", types.INT32, ["batch", "sequence"]),
         helper.make_tensor_value_info("lengths", types.INT32, ["batch"])],
        [helper.make_tensor_value_info("embeddings", types.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def model() -> bytes:
    return tiny_embedder()


@pytest.fixture(autouse=True)
def fresh_fake() -> Iterator[None]:
    trt.reset()
    yield
    trt.reset()


def configured(model: bytes, profiles: list[Any] = PROFILES) -> tuple[Any, Any, Any]:
    """Builder, parsed network and config with one profile per entry of profiles, as a backend would set them."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    for low, opt, high in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape("input_ids", low, opt, high)
        profile.set_shape("lengths", low[:1], opt[:1], high[:1])
        assert config.add_optimization_profile(profile) >= 0
    return builder, network, config


@pytest.fixture(scope="module")
def plan(model: bytes) -> bytes:
    builder, network, config = configured(model)
    return bytes(builder.build_serialized_network(network, config))


@pytest.fixture
def engine(plan: bytes) -> Any:
    return trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)


def aligned(array: np.ndarray) -> np.ndarray:
    """A copy of array whose data starts on a 256-byte boundary, as cudaMalloc's allocations do."""
    raw = np.zeros(array.nbytes + trt.ADDRESS_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % trt.ADDRESS_ALIGNMENT
    copy = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


def token_batch(rows: int, width: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, VOCAB, (rows, width), dtype=np.int32),
            rng.integers(1, width + 1, rows, dtype=np.int32))


def bind(context: Any, ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Shapes and addresses for one batch; the returned buffers must outlive the execution."""
    assert context.set_input_shape("input_ids", ids.shape) and context.set_input_shape("lengths", lengths.shape)
    buffers = {"input_ids": aligned(ids), "lengths": aligned(lengths),
               "embeddings": aligned(np.zeros(context.get_tensor_shape("embeddings"), np.float32))}
    for name, array in buffers.items():
        assert context.set_tensor_address(name, array.ctypes.data)
    return buffers


def errors() -> list[str]:
    return [message for severity, message in trt.LOGGED if severity <= trt.ILogger.ERROR]


def test_the_documented_sequence_gives_what_onnxruntime_gives(engine: Any, model: bytes) -> None:
    reference = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    context = engine.create_execution_context()
    for profile, (rows, width) in [(1, (5, 40)), (0, (3, 9)), (1, (16, 64))]:
        ids, lengths = token_batch(rows, width)
        assert context.set_optimization_profile_async(profile, STREAM)
        buffers = bind(context, ids, lengths)
        assert context.execute_async_v3(STREAM), errors()
        expected = reference.run(None, {"input_ids": ids, "lengths": lengths})[0]
        np.testing.assert_allclose(buffers["embeddings"], expected, rtol=1e-6, atol=1e-7)
    called = [name.split(".")[1] for name, _ in trt.CALLS if name.startswith("IExecutionContext.set")
              or name.endswith("execute_async_v3")]
    assert called[:7] == ["set_optimization_profile_async"] + ["set_input_shape"] * 2 + [
        "set_tensor_address"] * 3 + ["execute_async_v3"]
    assert ("IExecutionContext.set_input_shape", ("input_ids", (5, 40))) in trt.CALLS
    assert errors() == []


def test_the_engine_describes_its_io_tensors_and_profiles(engine: Any) -> None:
    assert [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)] == NAMES
    assert [engine.get_tensor_mode(n) for n in NAMES] == [trt.TensorIOMode.INPUT] * 2 + [trt.TensorIOMode.OUTPUT]
    assert [engine.get_tensor_dtype(n) for n in NAMES] == [trt.DataType.INT32] * 2 + [trt.DataType.FLOAT]
    assert [engine.get_tensor_shape(n) for n in NAMES] == [(-1, -1), (-1,), (-1, DIM)]
    assert engine.num_optimization_profiles == 2
    assert engine.get_tensor_profile_shape("input_ids", 1) == list(PROFILES[1])
    assert engine.get_tensor_profile_shape("lengths", 0) == [(1,), (4,), (8,)]
    # What TensorRT answers for names and indices it does not know: kNONE, kFLOAT, Dims{-1}.
    assert engine.get_tensor_mode("nope") == trt.TensorIOMode.NONE
    assert engine.get_tensor_dtype("nope") == trt.DataType.FLOAT
    assert engine.get_tensor_shape("nope") == ()
    assert engine.get_tensor_profile_shape("input_ids", 2) == [(), (), ()]
    assert engine.get_tensor_profile_shape("embeddings", 0) == [(), (), ()]
    assert engine.get_tensor_name(3) is None


def test_the_output_shape_follows_the_input_that_shares_its_symbolic_batch(engine: Any) -> None:
    context = engine.create_execution_context()
    assert context.set_optimization_profile_async(1, STREAM)
    assert context.get_tensor_shape("embeddings") == (-1, DIM)
    assert context.set_input_shape("input_ids", (3, 20))
    assert context.get_tensor_shape("embeddings") == (3, DIM)


def test_a_shape_outside_the_active_profile_is_refused(engine: Any) -> None:
    context = engine.create_execution_context()
    context.set_optimization_profile_async(0, STREAM)
    assert not context.set_input_shape("input_ids", (4, 32))  # inside profile 1, not in the active profile 0
    assert not context.set_input_shape("input_ids", (9, 8))
    assert not context.set_input_shape("input_ids", (0, 8))
    assert not context.set_input_shape("input_ids", (4,))  # rank
    assert not context.set_input_shape("embeddings", (4, DIM))  # not an input
    assert context.set_input_shape("input_ids", (8, 16))
    assert len(errors()) == 5


def test_input_shapes_before_a_profile_is_selected_are_refused(engine: Any) -> None:
    context = engine.create_execution_context()
    assert context.active_optimization_profile == 0  # assigned, but not yet selected
    assert not context.set_input_shape("input_ids", (2, 8))
    assert not context.execute_async_v3(STREAM)
    assert "set_optimization_profile_async" in errors()[0]


def test_execution_before_every_input_shape_is_set_fails(engine: Any) -> None:
    context = engine.create_execution_context()
    context.set_optimization_profile_async(0, STREAM)
    ids, lengths = token_batch(2, 8)
    buffers = bind(context, ids, lengths)
    context.set_optimization_profile_async(1, STREAM)  # a new profile drops the shapes set
    assert context.get_tensor_shape("input_ids") == (-1, -1)
    assert context.set_input_shape("input_ids", (2, 20))
    assert not context.execute_async_v3(STREAM)
    assert "lengths" in errors()[-1]
    assert buffers["embeddings"].sum() == 0


def test_selecting_the_same_profile_again_keeps_the_shapes(engine: Any) -> None:
    context = engine.create_execution_context()
    context.set_optimization_profile_async(0, STREAM)
    buffers = bind(context, *token_batch(2, 8))
    context.set_optimization_profile_async(0, STREAM)
    assert context.execute_async_v3(STREAM)
    assert buffers["embeddings"].any()


def test_execution_with_an_address_missing_fails(engine: Any) -> None:
    context = engine.create_execution_context()
    context.set_optimization_profile_async(0, STREAM)
    buffers = bind(context, *token_batch(2, 8))
    assert context.set_tensor_address("embeddings", 0)  # nullptr resets the address
    assert not context.execute_async_v3(STREAM)
    assert "embeddings" in errors()[-1]
    assert not buffers["embeddings"].any()


def test_an_address_off_the_256_byte_boundary_is_refused(engine: Any) -> None:
    context = engine.create_execution_context()
    context.set_optimization_profile_async(0, STREAM)
    buffer = aligned(np.zeros(64, np.int32))
    assert not context.set_tensor_address("input_ids", buffer.ctypes.data + 4)
    assert not context.set_tensor_address("no_such_tensor", buffer.ctypes.data)
    assert context.set_tensor_address("input_ids", buffer.ctypes.data)
    assert len(errors()) == 2


def test_handles_and_addresses_must_be_ints(engine: Any) -> None:
    context = engine.create_execution_context()
    with pytest.raises(TypeError):
        context.set_optimization_profile_async(0, object())  # a stream object instead of its handle
    with pytest.raises(TypeError):
        context.set_tensor_address("input_ids", 256.0)


@pytest.mark.parametrize("index", [2, -1])
def test_a_profile_index_out_of_range_raises_as_the_binding_does(engine: Any, index: int) -> None:
    context = engine.create_execution_context()
    with pytest.raises(RuntimeError, match="set optimization profile async"):
        context.set_optimization_profile_async(index, STREAM)
    assert f"no profile {index}" in errors()[0]


def test_two_live_contexts_cannot_hold_the_same_profile(engine: Any) -> None:
    first, second = engine.create_execution_context(), engine.create_execution_context()
    first.set_optimization_profile_async(0, STREAM)
    second.set_optimization_profile_async(1, STREAM)
    with pytest.raises(RuntimeError):
        second.set_optimization_profile_async(0, STREAM)
    assert "held by another context" in errors()[0]
    with pytest.raises(RuntimeError):
        first.set_optimization_profile_async(1, STREAM)
    del first
    gc.collect()
    second.set_optimization_profile_async(0, STREAM)  # profile 0 is free again, profile 1 let go
    third = engine.create_execution_context()
    third.set_optimization_profile_async(1, STREAM)
    bind(third, *token_batch(4, 30))
    assert third.execute_async_v3(STREAM)


def test_a_dynamic_network_without_profiles_does_not_build(model: bytes) -> None:
    builder, network, config = configured(model, profiles=[])
    assert builder.build_serialized_network(network, config) is None
    assert "no optimization profile" in errors()[0]


def test_a_profile_without_every_dynamic_input_does_not_build(model: bytes) -> None:
    builder, network, config = configured(model, profiles=[])
    profile = builder.create_optimization_profile()
    profile.set_shape("input_ids", (1, 1), (4, 8), (8, 16))
    assert config.add_optimization_profile(profile) == 0
    assert builder.build_serialized_network(network, config) is None
    assert "lengths" in errors()[0]


def test_a_profile_whose_rank_differs_from_the_network_does_not_build(model: bytes) -> None:
    builder, network, config = configured(model, profiles=[((1, 1, 1), (2, 2, 2), (4, 4, 4))])
    assert builder.build_serialized_network(network, config) is None


def test_inconsistent_profile_shapes_raise_and_leave_the_profile_invalid(model: bytes) -> None:
    builder, _, config = configured(model, profiles=[])
    profile = builder.create_optimization_profile()
    profile.set_shape("lengths", (1,), (4,), (8,))
    with pytest.raises(ValueError, match="opt"):  # opt below min
        profile.set_shape("input_ids", (4, 8), (2, 8), (8, 16))
    with pytest.raises(RuntimeError):  # the binding's type, too; max of another rank
        profile.set_shape("input_ids", (1, 1), (2, 8), (8,))
    assert not profile
    assert config.add_optimization_profile(profile) == -1


def test_the_network_and_the_plan_carry_what_was_configured(model: bytes) -> None:
    builder, network, config = configured(model)
    assert (network.num_inputs, network.num_outputs) == (2, 1)
    ids = network.get_input(0)
    assert (ids.name, ids.shape, ids.dtype) == ("input_ids", (-1, -1), trt.DataType.INT32)
    assert network.get_output(0).shape == (-1, DIM)
    config.set_flag(trt.BuilderFlag.FP16)
    assert config.get_flag(trt.BuilderFlag.FP16) and not config.get_flag(trt.BuilderFlag.BF16)
    plan = builder.build_serialized_network(network, config)
    assert isinstance(plan, trt.IHostMemory) and plan.nbytes == len(plan)
    assert b'"flags": ["FP16"]' in plan and model in plan
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    assert bytes(engine.serialize()) == bytes(plan)


def test_the_timing_cache_round_trips_and_counts_reuse(model: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    builder, network, config = configured(model)
    cache = config.create_timing_cache(b"")
    assert config.get_timing_cache() is None
    assert config.set_timing_cache(cache, ignore_mismatch=False)
    assert config.get_timing_cache() is cache
    assert builder.build_serialized_network(network, config) is not None
    first = bytes(cache.serialize())
    builder, network, config = configured(model)
    assert config.set_timing_cache(config.create_timing_cache(first), False)
    builder.build_serialized_network(network, config)
    second = config.get_timing_cache().serialize()
    reused = [json.loads(blob[blob.index(b"{"):])["reused"] for blob in (first, second)]
    assert reused == [0, 2]  # two profiles, each found in the cache on the second build
    monkeypatch.setattr(trt, "DEVICE", "another GPU")
    foreign = config.create_timing_cache(first)
    assert not config.set_timing_cache(foreign, ignore_mismatch=False)
    assert config.set_timing_cache(foreign, ignore_mismatch=True)
    with pytest.raises(ValueError):
        config.create_timing_cache(b"not a cache")


def test_deserialization_refuses_foreign_bytes_and_other_versions(plan: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = trt.Runtime(trt.Logger(trt.Logger.INTERNAL_ERROR))
    assert runtime.deserialize_cuda_engine(b"\x00" * 64) is None
    monkeypatch.setattr(trt, "__version__", "11.0.0-fake")  # engines are not portable across versions
    assert runtime.deserialize_cuda_engine(plan) is None
    assert len(errors()) == 2


def test_the_refuse_switch_imitates_tensorrt_rtx_on_an_unsupported_gpu(plan: bytes) -> None:
    trt.REFUSE_DESERIALIZE = "The engine cannot run on this GPU, which has compute capability 9.0"
    assert trt.Runtime(trt.Logger(trt.Logger.INTERNAL_ERROR)).deserialize_cuda_engine(plan) is None
    assert errors() == [f"deserialize_cuda_engine: {trt.REFUSE_DESERIALIZE}"]
    trt.reset()
    assert trt.REFUSE_DESERIALIZE is None and trt.CALLS == [] and trt.LOGGED == []


def test_the_parser_reports_bytes_that_are_no_onnx_model() -> None:
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    network = trt.Builder(logger).create_network()
    parser = trt.OnnxParser(network, logger)
    assert not parser.parse(b"this is no ONNX model")
    assert parser.num_errors == 1 and "ONNX" in parser.get_error(0).desc()
    assert network.num_inputs == 0


def test_errors_reach_a_python_logger_that_subclasses_ilogger(plan: bytes) -> None:
    class Collecting(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append((severity, msg))

    class Forgetful(trt.ILogger):
        def __init__(self) -> None:  # does not call ILogger.__init__, which TensorRT requires
            pass

        def log(self, severity: Any, msg: str) -> None:
            pass

    logger = Collecting()
    assert trt.Runtime(logger).deserialize_cuda_engine(b"junk") is None
    assert [severity for severity, _ in logger.messages] == [trt.ILogger.Severity.ERROR]
    with pytest.raises(TypeError):
        trt.Builder(Forgetful())


def test_it_stands_in_for_tensorrt_through_sys_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    import tensorrt

    assert tensorrt.Runtime is trt.Runtime and tensorrt.__version__.endswith("-fake")
