"""A fake of the part of TensorRT's Python API (10.x, 11.x) that embedq's TensorRT backend uses, for CI.

Inject it with ``monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)``. It refuses what the docs forbid.
"Device" addresses are host pointers: execute_async_v3 reads the inputs there, runs the plan's ONNX graph on ONNX
Runtime (CPU), writes the outputs back. CALLS holds (method, arguments), LOGGED each (severity, message) logged.
Shapes are tuples, () is Dims{-1, {}}. Written from NVIDIA's documentation, no code copied; sources, cited as [n]:
[1] IExecutionContext, [2] IOptimizationProfile, [3] ICudaEngine: include/NvInferRuntime.h, NVIDIA/TensorRT v10.16
    and v11.1 = https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvinfer1_1_1_i_<class>.html
[4] Python docstrings, python/docstrings/infer/pyCoreDoc.h = https://docs.nvidia.com/deeplearning/tensorrt/latest/
    _static/python-api/infer/Core/ (ExecutionContext, Builder, OptimizationProfile, Logger, Runtime pages)
[5] Python bindings, python/src/infer/pyCore.cpp (v10.16, v11.1): what the Python layer adds to the C++ calls
[6] ONNX parser: include/NvOnnxParser.h, python/docstrings/parsers/pyOnnxDoc.h
[7] "Engine Portability", https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/getting-started/support-matrix.html
[8] ../shared/TENSORRT.md: TensorRT-RTX builds engines on the H100/H200 but refuses to deserialize them there
"""

from __future__ import annotations

import ctypes
import enum
import functools
import hashlib
import json
import operator
import struct
import sys
import weakref
from collections import namedtuple
from typing import Any

import numpy as np

__version__ = "10.99.0-fake"
DEVICE = "fake GPU, compute capability 9.0"
REFUSE_DESERIALIZE: str | None = None  # a message: deserialization logs it and fails, as TensorRT-RTX does here [8]
CALLS: list[tuple[str, tuple[Any, ...]]] = []
LOGGED: list[tuple[Any, str]] = []
ADDRESS_ALIGNMENT = 256  # "The pointer must have at least 256-byte alignment." [1] setTensorAddress
_DEFAULTS = {"__version__": __version__, "DEVICE": DEVICE, "REFUSE_DESERIALIZE": None}
_PLAN_MAGIC, _CACHE_MAGIC = b"FAKE-TRT-PLAN\x00", b"FAKE-TRT-TIMING-CACHE\x00"


def reset() -> None:
    """Forget the recorded calls and messages; restore __version__, DEVICE and REFUSE_DESERIALIZE."""
    CALLS.clear()
    LOGGED.clear()
    globals().update(_DEFAULTS)


class _Recorded:  # appends ("Class.method", arguments) to CALLS for each public method called from outside
    def __getattribute__(self, name: str) -> Any:
        attribute = object.__getattribute__(self, name)
        if name.startswith("_") or not callable(attribute) or sys._getframe(1).f_globals is globals():
            return attribute
        def record(*args: Any, **kwargs: Any) -> Any:
            CALLS.append((f"{type(self).__name__}.{name}", args + tuple(kwargs.values())))
            return attribute(*args, **kwargs)
        return record


# Values of include/NvInferRuntimeBase.h and NvInfer.h (v10.16). Flags FP16, INT8, BF16: deprecated in 10.12,
# "superseded by strong typing"; EXPLICIT_BATCH: ignored since 10.0. Plans record flags; the fake runs the ONNX types.
DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "BF16": 7,
                                     "INT64": 8})
TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
BuilderFlag = enum.IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4,
                                           "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7, "FP8": 15,
                                           "BF16": 17})
MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0,
                                                                               "STRONGLY_TYPED": 1})
_Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})


class ILogger:  # a subclass calls ILogger.__init__(self) and defines log(severity, msg) [4]
    Severity = _Severity
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = tuple(_Severity)  # exported into ILogger [5]

    def __init__(self) -> None:
        self._fake_trt_base_initialised = True

    def log(self, severity: Any, msg: str) -> None:
        raise RuntimeError('Tried to call pure virtual function "ILogger::log"')

    @staticmethod
    def _checked(logger: Any) -> ILogger:
        if not getattr(logger, "_fake_trt_base_initialised", False):  # an ILogger, its __init__ called [4][5]
            raise TypeError(f"expected a tensorrt.ILogger on which ILogger.__init__ was called, got {logger!r}")
        return logger

    def _emit(self, severity: Any, msg: str) -> None:
        LOGGED.append((severity, msg))
        self.log(severity, msg)


class Logger(ILogger):  # prints messages of min_severity or more severe to stdout [4][5]
    def __init__(self, min_severity: Any = _Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity: Any, msg: str) -> None:
        if severity <= self.min_severity:
            print(f"[TRT] [{'FEWIV'[severity]}] {msg}")


IHostMemory = type("IHostMemory", (bytes,), {"nbytes": property(len)})
ParserError = type("ParserError", (str,), {"desc": str.__str__})  # get_error(i).desc() [6]
# shape: -1 for a dynamic dimension; dim_names (the fake's own): ONNX symbolic names, to resolve output shapes
ITensor = namedtuple("ITensor", "name shape dtype dim_names")
# set_shape's docstring says it raises ValueError [4], the binding raises RuntimeError [5]: this is both.
_ProfileShapeError = type("_ProfileShapeError", (ValueError, RuntimeError), {})
# Only what numpy can hold (so no BF16 at the I/O): a limit of the fake, not of TensorRT.
_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32,
          DataType.INT64: np.int64, DataType.BOOL: np.bool_, DataType.INT8: np.int8}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL,
              3: DataType.INT8}


class INetworkDefinition(_Recorded):
    def __init__(self, flags: int) -> None:
        self.flags, self._onnx, self._inputs, self._outputs = flags, b"", [], []

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))
    def get_input(self, index: int) -> ITensor: return self._inputs[index]
    def get_output(self, index: int) -> ITensor: return self._outputs[index]


class OnnxParser(_Recorded):  # fills a network's inputs and outputs from a serialized ONNX model [6]
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self._network, self._logger, self._errors = network, ILogger._checked(logger), []

    num_errors = property(lambda self: len(self._errors))
    def get_error(self, index: int) -> ParserError: return self._errors[index]

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        try:
            proto = onnx.shape_inference.infer_shapes(onnx.load_model_from_string(bytes(model)))
            onnx.checker.check_model(proto)
            weights = {i.name for i in proto.graph.initializer}
            inputs = [self._tensor(v) for v in proto.graph.input if v.name not in weights]
            outputs = [self._tensor(v) for v in proto.graph.output]
        except Exception as exc:  # "true if the model was parsed successfully" [6]
            self._errors.append(ParserError(f"failed to parse the ONNX model: {exc}"))
            self._logger._emit(_Severity.ERROR, f"ModelImporter: {exc}")
            return False
        self._network._inputs, self._network._outputs, self._network._onnx = inputs, outputs, bytes(model)
        return True

    @staticmethod
    def _tensor(value: Any) -> ITensor:
        kind, dims = value.type.tensor_type, value.type.tensor_type.shape.dim
        if kind.elem_type not in _FROM_ONNX or not kind.HasField("shape"):
            raise ValueError(f"{value.name}: the fake supports no element type {kind.elem_type} or unknown rank")
        return ITensor(value.name, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims),
                       _FROM_ONNX[kind.elem_type], tuple(d.dim_param or None for d in dims))


class IOptimizationProfile(_Recorded):
    def __init__(self) -> None:
        self._shapes: dict[str, list[tuple[int, ...]]] = {}

    def get_shape(self, input: str) -> list[tuple[int, ...]]: return list(self._shapes.get(input, []))
    def __bool__(self) -> bool: return all(len(s) == 3 for s in self._shapes.values())  # isValid() [2]

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # (1), (2) of [2][4]; the rest at build
        staged: list[tuple[int, ...]] = []
        for label, shape in (("min", min), ("opt", opt), ("max", max)):
            dims, before = tuple(int(d) for d in shape), staged[-1] if staged else None
            if any(d < 0 for d in dims) or (before is not None and (
                    len(dims) != len(before) or any(b > d for b, d in zip(before, dims, strict=True)))):
                self._shapes[input] = staged  # what was accepted stays: the profile is left invalid
                raise _ProfileShapeError(f"Shape provided for {label} is inconsistent with other shapes.")
            staged.append(dims)
        self._shapes[input] = staged


class ITimingCache(_Recorded):
    def __init__(self, device: str, entries: dict[str, int]) -> None:
        self._device, self._entries = device, entries  # entry -> how many later builds found it

    def serialize(self) -> IHostMemory:
        body = {"device": self._device, "entries": self._entries, "reused": sum(self._entries.values())}
        return IHostMemory(_CACHE_MAGIC + json.dumps(body, sort_keys=True).encode())


class IBuilderConfig(_Recorded):
    def __init__(self, logger: ILogger) -> None:
        self._logger, self._cache, self._flags, self._pools, self._profiles = logger, None, set(), {}, []

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None: self._pools[str(pool)] = pool_size
    def set_flag(self, flag: Any) -> None: self._flags.add(BuilderFlag(flag))
    def get_flag(self, flag: Any) -> bool: return BuilderFlag(flag) in self._flags
    def get_timing_cache(self) -> ITimingCache | None: return self._cache

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile:  # "must satisfy bool(profile) == True ... or -1 if the input is not valid" [4]
            return -1
        # A copy: the docs do not say whether later set_shape calls reach the config; in the fake they do not.
        self._profiles.append({name: list(shapes) for name, shapes in profile._shapes.items()})
        return len(self._profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)  # b"": a new cache [4]; other bytes (undocumented): ValueError
        if data and not data.startswith(_CACHE_MAGIC):
            raise ValueError("create_timing_cache: the bytes are not a serialized timing cache")
        body = json.loads(data.removeprefix(_CACHE_MAGIC) or '{"entries": {}}')
        return ITimingCache(body.get("device", DEVICE), body["entries"])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache._device != DEVICE and not ignore_mismatch:  # the cache's verification header [4]
            self._logger._emit(_Severity.ERROR, f"timing cache made on '{cache._device}', this is '{DEVICE}'")
            return False
        self._cache = cache
        return True


class Builder(_Recorded):
    def __init__(self, logger: ILogger) -> None:
        self._logger = ILogger._checked(logger)

    def create_network(self, flags: int = 0) -> INetworkDefinition: return INetworkDefinition(flags)
    def create_builder_config(self) -> IBuilderConfig: return IBuilderConfig(self._logger)
    def create_optimization_profile(self) -> IOptimizationProfile: return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        if error := self._error(network, config._profiles):
            self._logger._emit(_Severity.ERROR, f"build_serialized_network: {error}")
            return None
        # Without dynamic inputs a profile may be left out: one is generated from the network's shapes [2].
        profiles = [{t.name: p.get(t.name, [t.shape] * 3) for t in network._inputs} for p in config._profiles or [{}]]
        flags = sorted(f.name for f in config._flags)
        for profile in profiles if config._cache is not None else ():  # an entry a profile; found again: reused
            key = hashlib.sha256(network._onnx + json.dumps([profile, flags]).encode()).hexdigest()[:16]
            config._cache._entries[key] = config._cache._entries.get(key, -1) + 1
        tensors = [(TensorIOMode.INPUT, *t) for t in network._inputs] + [(TensorIOMode.OUTPUT, *t)
                                                                         for t in network._outputs]
        header = json.dumps({"version": __version__, "device": DEVICE, "network_flags": network.flags,
                             "flags": flags, "memory_pools": config._pools, "profiles": profiles,
                             "tensors": [(m, n, d.name, s, k) for m, n, s, d, k in tensors]}).encode()
        return IHostMemory(_PLAN_MAGIC + struct.pack("<Q", len(header)) + header + network._onnx)

    @staticmethod
    def _error(network: INetworkDefinition, profiles: list[dict[str, list[tuple[int, ...]]]]) -> str | None:
        dynamic = [t.name for t in network._inputs if -1 in t.shape]
        if not network._outputs:
            return "the network has no outputs (was the ONNX model parsed?)"
        if dynamic and not profiles:  # "must be called at least once if the network has dynamic ... inputs" [4]
            return f"the inputs {dynamic} have dynamic dimensions and no optimization profile was added"
        for index, profile in enumerate(profiles):
            for t in network._inputs:
                if t.name in dynamic and t.name not in profile:  # set_shape "must be called for" each one [4]
                    return f"optimization profile {index} sets no shape for the dynamic input {t.name}"
                for shape in profile.get(t.name, ()):  # conditions (1) and (3) of [2], checked at build time
                    if len(shape) != len(t.shape) or any(n not in (-1, d) for n, d in zip(t.shape, shape, strict=True)):
                        return f"optimization profile {index}: {t.name} {shape} does not fit the network's {t.shape}"
        return None


class Runtime(_Recorded):
    def __init__(self, logger: ILogger) -> None:
        self._logger = ILogger._checked(logger)

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:  # None: see the log [4]
        data, start = bytes(memoryview(serialized_engine)), len(_PLAN_MAGIC) + 8
        error = REFUSE_DESERIALIZE or ("" if data.startswith(_PLAN_MAGIC) else "not a serialized engine")
        if not error:
            end = start + struct.unpack_from("<Q", data, len(_PLAN_MAGIC))[0]
            header = json.loads(data[start:end])
            if (header["version"], header["device"]) == (__version__, DEVICE):  # not portable across either [7]
                return ICudaEngine(data, header, data[end:], self._logger)
            error = f"built by {header['version']} for '{header['device']}'; this is {__version__} on '{DEVICE}'"
        self._logger._emit(_Severity.ERROR, f"deserialize_cuda_engine: {error}")
        return None


class ICudaEngine(_Recorded):
    def __init__(self, plan: bytes, header: dict[str, Any], onnx_bytes: bytes, logger: ILogger) -> None:
        self._plan, self._onnx, self._logger = plan, onnx_bytes, logger
        self._tensors = {name: (TensorIOMode(mode), DataType[dtype], tuple(shape), tuple(dim_names))
                         for mode, name, dtype, shape, dim_names in header["tensors"]}
        self._names = list(self._tensors)  # inputs first, then outputs
        self._inputs = [n for n, t in self._tensors.items() if t[0] == TensorIOMode.INPUT]
        self._profiles = [{n: [tuple(s) for s in shapes] for n, shapes in p.items()} for p in header["profiles"]]
        self._dynamic = any(-1 in self._tensors[n][2] for n in self._inputs)
        self._holders: dict[int, weakref.ref[IExecutionContext]] = {}  # profile -> context that selected it

    num_io_tensors = property(lambda self: len(self._names))
    num_optimization_profiles = property(lambda self: len(self._profiles))  # always at least 1 [3]
    def get_tensor_name(self, index: int) -> str | None: return dict(enumerate(self._names)).get(index)
    def get_tensor_mode(self, name: str) -> Any: return self._tensors.get(name, (TensorIOMode.NONE,))[0]  # [3]
    def get_tensor_dtype(self, name: str) -> Any: return self._tensors.get(name, (0, DataType.FLOAT))[1]  # [3]
    def get_tensor_shape(self, name: str) -> tuple[int, ...]: return self._tensors.get(name, (0, 0, ()))[2]  # [3]
    def create_execution_context(self) -> IExecutionContext: return IExecutionContext(self)
    def serialize(self) -> IHostMemory: return IHostMemory(self._plan)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        if 0 <= profile_index < len(self._profiles) and name in self._inputs:
            return list(self._profiles[profile_index][name])
        return [(), (), ()]  # Dims{-1} for a bad index or a name that is no input [3]

    @functools.cached_property
    def _session(self) -> Any:
        import onnxruntime

        return onnxruntime.InferenceSession(self._onnx, providers=["CPUExecutionProvider"])


class IExecutionContext(_Recorded):
    def __init__(self, engine: ICudaEngine) -> None:
        self._engine, self._profile, self._selected = engine, 0, False  # a new context has profile 0 [1][3]
        self._shapes, self._addresses = {}, {}  # name -> shape set, name -> address set

    active_optimization_profile = property(lambda self: self._profile)  # read-only [4]

    def _refuse(self, message: str) -> bool:
        self._engine._logger._emit(_Severity.ERROR, message)
        return False

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:  # or raises [5]
        operator.index(stream_handle)  # the binding takes an int (size_t), not a stream object [5]
        engine = self._engine
        holder = engine._holders.get(profile_index, lambda: None)()
        # "each execution context in concurrent use must use a separate optimization profile" (engines with
        # dynamic shapes) [1]. The fake cannot see concurrency: "in use" is "selected by a context still alive".
        if engine._dynamic and holder is not None and holder is not self:
            self._refuse(f"set_optimization_profile_async: profile {profile_index} is held by another context")
            raise RuntimeError("Error in set optimization profile async.")
        if not 0 <= profile_index < len(engine._profiles):  # between 0 and getNbOptimizationProfiles()-1 [1]
            self._refuse(f"set_optimization_profile_async: no profile {profile_index} in {len(engine._profiles)}")
            raise RuntimeError("Error in set optimization profile async.")
        if engine._dynamic:  # let go of the profile held so far, hold the new one
            engine._holders.pop(self._profile if self._selected else -1, None)
            engine._holders[profile_index] = weakref.ref(self)
        if profile_index != self._profile:  # changing it invalidates the input shapes [4]; the same one keeps them
            self._shapes.clear()
        self._profile, self._selected = profile_index, True
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        if name not in self._engine._inputs:  # false if the name is not an input [1]
            return self._refuse(f"set_input_shape: {name} is not an input tensor")
        if self._engine._dynamic and not self._selected:  # the profile before the shapes [1]
            return self._refuse("set_input_shape: call set_optimization_profile_async() first")
        dims, network = tuple(int(d) for d in shape), self._engine._tensors[name][2]
        if len(dims) != len(network) or any(n not in (-1, d) for n, d in zip(network, dims, strict=True)):  # [1]
            return self._refuse(f"set_input_shape: {name} {dims} does not agree with the network's {network}")
        low, _, high = self._engine._profiles[self._profile][name]
        if any(not lo <= d <= hi for lo, d, hi in zip(low, dims, high, strict=True)):  # "a runtime error" [2]
            return self._refuse(f"set_input_shape: {name} {dims} is outside profile {self._profile}: {low}-{high}")
        self._shapes[name] = dims
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:  # -1 while unknown [1]; outputs via ONNX dim names
        if name not in self._engine._tensors:
            return ()
        _, _, network, dim_names = self._engine._tensors[name]
        if name in self._engine._inputs:
            low, _, high = self._engine._profiles[self._profile][name]  # min == max pins a dimension [1]
            return self._shapes.get(name) or tuple(
                n if n != -1 or lo != hi else lo for n, lo, hi in zip(network, low, high, strict=True))
        known = {k: d for i in self._engine._inputs for k, d in zip(
            self._engine._tensors[i][3], self.get_tensor_shape(i), strict=True) if k and d != -1}
        return tuple(n if n != -1 else known.get(k or "", -1) for n, k in zip(network, dim_names, strict=True))

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self._engine._tensors:  # false for a name that is no input or output [1]
            return self._refuse(f"set_tensor_address: {name} is not an input or output tensor")
        operator.index(memory)
        if memory % ADDRESS_ALIGNMENT:  # [1] setTensorAddress; setOutputTensorAddress returns false for it
            return self._refuse(f"set_tensor_address: {name} at {memory:#x} is not {ADDRESS_ALIGNMENT}-byte aligned")
        self._addresses[name] = memory  # 0 (nullptr) resets it to the default, no address [1]
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        """Run the graph on the host buffers at the set addresses; False with an error logged where [1] forbids."""
        operator.index(stream_handle)  # the binding takes an int (size_t), not a stream object [5]
        engine = self._engine
        if engine._dynamic and not self._selected:  # the profile "must be set ... before calling ... enqueue" [1]
            return self._refuse("execute_async_v3: no optimization profile was selected on this context")
        if unset := [n for n in engine._inputs if -1 in self.get_tensor_shape(n)]:  # before enqueueV3() [1]
            return self._refuse(f"execute_async_v3: input shapes not set: {unset}")
        if missing := [n for n in engine._names if not self._addresses.get(n)]:  # non-null, inputs and outputs [1]
            return self._refuse(f"execute_async_v3: no address set for {missing}")
        session = engine._session
        results = session.run(None, {n: self._read(n) for n in engine._inputs})
        for output, value in zip(session.get_outputs(), results, strict=True):
            value = np.ascontiguousarray(value, _NUMPY[engine._tensors[output.name][1]])
            expected = self.get_tensor_shape(output.name)
            if len(expected) != value.ndim or any(e not in (-1, v) for e, v in zip(expected, value.shape, strict=True)):
                return self._refuse(f"execute_async_v3: {output.name} came out {value.shape}, expected {expected}")
            ctypes.memmove(self._addresses[output.name], value.ctypes.data, value.nbytes)
        return True

    def _read(self, name: str) -> np.ndarray:
        kind, shape = np.dtype(_NUMPY[self._engine._tensors[name][1]]), self.get_tensor_shape(name)
        buffer = (ctypes.c_char * (int(np.prod(shape)) * kind.itemsize)).from_address(self._addresses[name])
        return np.frombuffer(buffer, dtype=kind).reshape(shape).copy()
