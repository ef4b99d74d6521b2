"""A simulated CUDA device for the test suite: the code's GPU paths run on CPU and fail where a GPU would.

No GPU has to be present. `simulated_cuda()` (the `fake_cuda` fixture in conftest.py) makes
`torch.cuda.is_available()` true, so `--device auto|cuda` resolve to `cuda:0`, and every tensor put
there is a `FakeCudaTensor`: a wrapper (as FakeTensor and DTensor are, `_make_wrapper_subclass`) whose
`.device` is `cuda:0` while it holds and computes on a CPU tensor inside. It raises as CUDA does:

- an op mixing it with a CPU tensor of one element or more: "Expected all tensors to be on the same device"
  (0-dim CPU tensors are scalars to CUDA too, and CPU indices may index a CUDA tensor);
- `.numpy()` / `np.asarray(...)` on it: "can't convert cuda:0 device type tensor to numpy";
- a CPU generator driving a CUDA factory (and the reverse).

`.cpu()` / `.to("cpu")` return real CPU tensors; `.item()` / `.tolist()` work (they sync on a GPU).
A wrapper does not own storage, so anything reading its memory behind torch's back (a C extension,
`data_ptr`) fails too.

Why the C++ device is CPU: the autograd engine asks the CUDA driver for the current stream of every
tensor whose C++ device is cuda, which aborts the process on a machine without one. The wrapper is a
CPU tensor to C++ and `cuda:0` to Python (`.device`, `.is_cuda`, `.get_device()`), which is where the
code decides where things go; the device checks CUDA's kernels make are made here, in
`__torch_dispatch__`.

Three consequences of that, handled here: autograd formulas cast gradients with the C++ device (a
dispatch-level `_to_copy(device=cpu)` stays on the simulated GPU: Python's `.cpu()` is moved in
`__torch_function__`); `Module.to` must replace parameters, not assign `.data` (overwrite-on-conversion is on);
and a view made in inference mode of a normal tensor is made a normal tensor, as autograd expects.
The mode is thread-local and off inside its own handler: backward is run re-entering it (custom backward passes
create tensors with `device=grad.device`), and threads started while it runs are put inside it.

What it cannot see: speed, real kernels and their numerics (TF32, bf16 accumulation), memory limits (the
memory queries answer, the peak is not tracked), several GPUs / NCCL, streams and asynchronous errors,
subprocesses, threads started before it (docs/gpu.md).
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import return_and_correct_aliasing

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
GPU_NAME = "Simulated CUDA device (tests/fake_cuda.py)"
TOTAL_MEMORY = 80 * 2**30
aten = torch.ops.aten
# torch.Generator is replaced while the simulation runs: type checks use the real class
_TorchGenerator = torch._C.Generator

# CUDA accepts CPU tensors in these argument positions (indices are copied over by the kernel).
_CPU_INDICES_OK = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# copies between devices
_CROSS_DEVICE = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default,
                 aten._copy_from_and_resize.default}


def _mixed_device_error(func) -> RuntimeError:
    return RuntimeError("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and "
                        f"cpu! (simulated CUDA, in {func})")


class FakeCudaTensor(torch.Tensor):
    """A tensor on the simulated `cuda:0`: its data is the CPU tensor `.elem`, reachable only through torch ops."""

    elem: torch.Tensor
    __slots__ = ["elem"]

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", type(elem)
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=CPU, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    # what Python sees: a CUDA tensor
    @property
    def device(self) -> torch.device:
        return CUDA

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def is_cpu(self) -> bool:
        return False

    def get_device(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"FakeCudaTensor({self.elem!r}, device='cuda:0')"

    # data access CUDA refuses or does with a sync
    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first. (simulated CUDA)")

    def __array__(self, *args, **kwargs):
        return self.numpy()

    def tolist(self):
        return self.cpu().tolist()

    def data_ptr(self) -> int:
        raise RuntimeError("data_ptr of a simulated CUDA tensor: its memory is not addressable from the host")

    def pin_memory(self, *args, **kwargs):
        raise RuntimeError("cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors can be pinned (simulated CUDA)")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Tensor.to / .cpu / .cuda are no-ops to C++ (the wrapper's C++ device is CPU): moves happen here
        if func is torch.Tensor.cpu:
            return _ToCpu.apply(args[0])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            moved = _to(args, kwargs)
            if moved is not NotImplemented:
                return moved
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _check_devices(func, args, kwargs)
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        # a _to_copy to device=cpu here comes from C++ (autograd formulas use the wrapper's C++ device, CPU): it
        # stays on the GPU, as `.cpu()` / `.to("cpu")` from Python are moved in __torch_function__ instead
        if func.is_view and torch.is_inference_mode_enabled() and not args[0].is_inference():
            # a view of a normal tensor is a normal tensor in inference mode too (autograd sets its version counter)
            with torch.inference_mode(False):
                out = tree_map(_wrap, out)
        else:
            out = tree_map(_wrap, out)
        if torch.is_inference_mode_enabled():
            return _inference_aliasing(func, args, kwargs, out)
        return return_and_correct_aliasing(func, args, kwargs, out)


def _inference_aliasing(func, args, kwargs, out):
    """return_and_correct_aliasing cannot re-point an inference tensor's version counter (views fail). The data
    is aliased already (a view's `.elem` is a view of the base's), so only in-place and out= ops need their
    mutated argument back as the result."""
    schema = func._schema
    if schema.name.endswith("_") or getattr(func._overloadpacket, "__name__", "").endswith("_"):
        return args[0]
    if "out" in kwargs:
        return kwargs["out"]
    return out


def _unwrap(t):
    return t.elem if isinstance(t, FakeCudaTensor) else t


def _wrap(t):
    if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor):
        return FakeCudaTensor(t)
    return t


def _check_devices(func, args, kwargs) -> None:
    flat, _ = tree_flatten((args, kwargs))
    if func in _CROSS_DEVICE:
        return
    gens = [a for a in flat if isinstance(a, _TorchGenerator)]
    if gens and not all(getattr(g, "is_fake_cuda", False) for g in gens):
        raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu' (simulated CUDA)")
    if func in _CPU_INDICES_OK:
        self_, rest = args[0], args[2:] if len(args) > 2 else ()
        tensors = [self_, *[a for a in tree_flatten((rest, kwargs))[0]]]
    else:
        tensors = flat
    if any(isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) and t.dim() > 0 for t in tensors):
        raise _mixed_device_error(func)


def _cuda_index(device) -> int | None:
    """None for a CPU device, 0 for cuda:0; other CUDA ordinals fail as on a one-GPU machine."""
    if device is None:
        return None
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda":
        return None
    if device.index not in (None, 0):
        raise RuntimeError(f"CUDA error: invalid device ordinal (simulated CUDA has one device, asked for {device})")
    return 0


class _ToCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.elem.clone()

    @staticmethod
    def backward(ctx, grad):
        return FakeCudaTensor(grad.contiguous().clone())


class _ToCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return FakeCudaTensor(x.detach().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad.elem.clone() if isinstance(grad, FakeCudaTensor) else grad


def to_cuda(t: torch.Tensor) -> FakeCudaTensor:
    """A copy of CPU tensor `t` on the simulated GPU (autograd flows back to `t`)."""
    if isinstance(t, FakeCudaTensor):
        return t
    return _ToCuda.apply(t)


def _to(args, kwargs):
    """Tensor.to(...) for both kinds of tensor; NotImplemented when it does not move between devices."""
    self_, rest = args[0], args[1:]
    if rest and isinstance(rest[0], torch.Tensor):  # .to(other): other's device and dtype
        other = rest[0]
        device, dtype = other.device, other.dtype
        non_blocking = kwargs.get("non_blocking", False)
        memory_format = kwargs.get("memory_format")
        copy = kwargs.get("copy", False)
    else:
        copy = kwargs.pop("copy", False) if "copy" in kwargs else False
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
    keep = {k: v for k, v in (("dtype", dtype), ("memory_format", memory_format)) if v is not None}
    on_gpu = isinstance(self_, FakeCudaTensor)
    if device is None:
        return NotImplemented
    wants_gpu = _cuda_index(device) is not None
    with torch._C.DisableTorchFunctionSubclass():
        if on_gpu and not wants_gpu:
            return _ToCpu.apply(self_).to(**keep)
        if not on_gpu and wants_gpu:
            return to_cuda(self_.to(**keep) if keep else self_)
        if on_gpu and wants_gpu:
            return self_.to(**keep, copy=copy) if (keep or copy) else self_
    return NotImplemented


# ------------------------------------------------------------------ factories and moves of CPU tensors


_DATA_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}


def _backward(tensors, gradient=None, retain_graph=None, create_graph=False, inputs=None, grad_tensors=None):
    """torch.autograd.backward's body below its __torch_function__ check (torch.autograd.grad is not covered)."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(gradient if gradient is not None else grad_tensors,
                                                             len(tensors)), is_grads_batched=False)
    inputs = () if inputs is None else (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph,
                         inputs, allow_unreachable=True, accumulate_grad=True)


class SimulatedCudaMode(TorchFunctionMode):
    """`device="cuda"` on any torch call (factories, *_like, new_*) and `.to("cuda")` / `.cuda()` of CPU tensors
    produce FakeCudaTensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.backward, torch.autograd.backward):
            # a mode is off while its handler runs, and backward runs inside this one: re-entered around the
            # engine, custom backward passes creating tensors with device=grad.device still get simulated ones
            with self:
                return _backward(*args, **kwargs)
        if func is torch.Tensor.cuda:
            _cuda_index(args[1] if len(args) > 1 else kwargs.get("device", 0))
            return to_cuda(args[0])
        if func is torch.Tensor.to:
            moved = _to(args, dict(kwargs))
            return func(*args, **kwargs) if moved is NotImplemented else moved
        if func is torch.Tensor.type_as:  # other's device and dtype, as .to(other)
            return _to((args[0], args[1]), {})
        if func is torch.Tensor.new_tensor and "device" not in kwargs and isinstance(args[0], FakeCudaTensor):
            return to_cuda(func(*args, **kwargs))  # C++ takes the wrapper's own (CPU) device
        if func is torch.Tensor.is_pinned:
            return bool(getattr(args[0], "_fake_pinned", False))
        if "device" not in kwargs:
            _check_generator(kwargs, cuda=False, args=args)
            return func(*args, **kwargs)
        on_gpu = _cuda_index(kwargs["device"]) is not None
        _check_generator(kwargs, cuda=on_gpu, args=args)
        kwargs.pop("pin_memory", None)
        has_gpu_arg = any(isinstance(a, FakeCudaTensor) for a in tree_flatten((args, kwargs))[0])
        if not on_gpu:
            out = func(*args, **kwargs)
            return tree_map(lambda t: t.cpu() if isinstance(t, FakeCudaTensor) else t, out) if has_gpu_arg else out
        if has_gpu_arg:
            kwargs.pop("device")
            if func in _DATA_FACTORIES:
                data = args[0]
                return data.to(**{k: v for k, v in kwargs.items() if k == "dtype"})
        else:
            kwargs["device"] = CPU
        out = func(*args, **kwargs)
        return tree_map(lambda t: to_cuda(t) if isinstance(t, torch.Tensor) else t, out)


def _check_generator(kwargs, cuda: bool, args=()) -> None:
    g = kwargs.get("generator")
    if not isinstance(g, _TorchGenerator):
        return
    on_gpu_args = any(isinstance(a, FakeCudaTensor) for a in tree_flatten(args)[0])
    if getattr(g, "is_fake_cuda", False) != (cuda or on_gpu_args):
        want, got = ("cuda", "cpu") if (cuda or on_gpu_args) else ("cpu", "cuda")
        raise RuntimeError(f"Expected a '{want}' device type for generator but found '{got}' (simulated CUDA)")


class FakeCudaGenerator(_TorchGenerator):
    """torch.Generator(device="cuda"): a CPU generator that reports cuda:0 (and is refused by CPU factories)."""

    is_fake_cuda = True

    @property
    def device(self) -> torch.device:
        return CUDA


class _Generator(_TorchGenerator):
    """What `torch.Generator` is while the simulation runs: device="cuda" gives a FakeCudaGenerator."""

    def __new__(cls, device=None):
        if _cuda_index(device) is not None:
            return FakeCudaGenerator()
        return _TorchGenerator() if device is None else _TorchGenerator(device)


# ------------------------------------------------------------------ torch.cuda.* and friends


class _Memory:
    """What torch.cuda's memory queries report: the bytes of live FakeCudaTensors is not tracked, so the peak is
    what the code asked to reset; good enough for code that prints or logs them."""

    def __init__(self):
        self.peak = 0

    def allocated(self, device=None) -> int:
        _cuda_index(device if device is not None else 0)
        return 0

    def max_allocated(self, device=None) -> int:
        _cuda_index(device if device is not None else 0)
        return self.peak

    def reset_peak(self, device=None) -> None:
        _cuda_index(device if device is not None else 0)
        self.peak = 0

    def get_info(self, device=None) -> tuple[int, int]:
        _cuda_index(device if device is not None else 0)
        return TOTAL_MEMORY, TOTAL_MEMORY


def _autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
    """torch.autocast("cuda", ...) as CPU autocast: the simulated tensors are CPU tensors to the dispatcher, so CPU
    autocast casts their matmuls to bf16 as CUDA autocast would (bf16 and fp16 both run on CPU)."""
    real = torch.amp.autocast_mode.autocast
    if device_type == "cuda":
        device_type = "cpu"
    return real(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


def _pin_memory(self, *args, **kwargs):
    """Tensor.pin_memory() without a driver: a copy flagged pinned (page-locking changes nothing else here)."""
    if isinstance(self, FakeCudaTensor):
        return FakeCudaTensor.pin_memory(self)
    out = self.clone()
    out._fake_pinned = True
    return out


def _properties(device=None):
    """torch.cuda.get_device_properties: the fields code reads to size its work."""
    import types

    _cuda_index(device if device is not None else 0)
    return types.SimpleNamespace(name=GPU_NAME, total_memory=TOTAL_MEMORY, major=9, minor=0,
                                 multi_processor_count=132, is_integrated=False)


class _Stream:
    """The one (default) stream: work is done when it is queued, nothing is being captured into a graph."""

    device = CUDA

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def is_capturing(self) -> bool:
        return False

    def wait_stream(self, other) -> None:
        pass


_active = threading.Lock()


@contextlib.contextmanager
def simulated_cuda(monkeypatch):
    """Run the body with one simulated CUDA GPU (see the module docstring); `monkeypatch` undoes the patches."""
    if not _active.acquire(blocking=False):
        raise RuntimeError("simulated_cuda is already active")
    mem = _Memory()
    cuda = torch.cuda
    for name, value in {
        "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
        "is_initialized": lambda: True,
        "set_device": lambda d: _cuda_index(d), "get_device_name": lambda d=None: (_cuda_index(d or 0), GPU_NAME)[1],
        "get_device_capability": lambda d=None: (9, 0), "get_device_properties": _properties, "is_bf16_supported": lambda *a, **k: True,
        "synchronize": lambda d=None: _cuda_index(d or 0), "empty_cache": lambda: None,
        "memory_allocated": mem.allocated, "max_memory_allocated": mem.max_allocated,
        "memory_reserved": mem.allocated, "max_memory_reserved": mem.max_allocated,
        "reset_peak_memory_stats": mem.reset_peak, "mem_get_info": mem.get_info,
        "manual_seed": lambda s: None, "manual_seed_all": lambda s: None,
        "current_stream": lambda d=None: _Stream(), "default_stream": lambda d=None: _Stream(),
        "is_current_stream_capturing": lambda: False,
    }.items():
        monkeypatch.setattr(cuda, name, value)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "set_device_index", lambda d: _cuda_index(torch.device("cuda", d)
                                                                                      if isinstance(d, int) else d))
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda d=None: None, raising=False)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: CUDA)
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda d=None: _Stream())
    # Module.to() would otherwise `param.data = moved`, which keeps the Python object a plain CPU Parameter
    monkeypatch.setattr(torch.__future__, "_overwrite_module_params_on_conversion", True)
    monkeypatch.setattr(torch, "autocast", _autocast)
    monkeypatch.setattr(torch.amp, "autocast", _autocast)
    monkeypatch.setattr(torch, "Generator", _Generator)
    # the prefetch / DataLoader pin-memory threads do not see the (thread-local) mode: the class attribute they do
    monkeypatch.setattr(torch.Tensor, "pin_memory", _pin_memory)
    mode = SimulatedCudaMode()
    # the mode is thread-local: threads started while the simulation runs (prefetchers, a web server's workers)
    # run inside it too; threads started before it (a pool already running) do not see it
    bootstrap = threading.Thread._bootstrap_inner

    def inside_mode(thread):
        with mode:
            bootstrap(thread)

    monkeypatch.setattr(threading.Thread, "_bootstrap_inner", inside_mode)
    try:
        with mode:
            yield
    finally:
        _active.release()
