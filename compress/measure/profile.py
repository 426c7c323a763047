"""Where a model's cost goes, layer by layer, against what this machine can do.

Per module (its own ops, children excluded, so the rows add up to the whole model): type,
output shape, parameters, MACs (``torch.utils.flop_counter``), bytes read and written
(the evaluator's memory-access counter), arithmetic intensity, the time measured by the
PyTorch profiler, and whether the layer sits under the compute roof or the bandwidth
slope of a roofline whose peaks are measured on this machine (GEMM and copy
microbenchmarks, cached per machine), never assumed.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch import nn
from torch.profiler import ProfilerActivity, record_function
from torch.profiler import profile as torch_profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from compress.core.traits import traits
from compress.measure.machine import machine_peaks


@contextlib.contextmanager
def _quiet_native_stderr():
    """The profiler's C++ side (kineto) prints start/stop lines and, on a CPU-only machine,
    a CUDA probe error straight to file descriptor 2; hide them while it runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


LABEL = "compress::"


class _MemoryAccess(TorchDispatchMode):
    """Bytes read and written by every op that touches memory, as it would run.

    Views cost nothing. Quantize/dequantize pairs are folded away: a tensor that is
    dequantized before use is read at its stored width (1 byte for int8), and an op output
    that is quantized right after is written at the quantized width.
    """

    def __init__(self, element_bytes: int | None):
        super().__init__()
        self.element_bytes = element_bytes
        self.total = 0
        self.stored_width: dict[int, int] = {}  # id(tensor) -> bytes per element as stored
        self.written: dict[int, int] = {}  # id(tensor) -> bytes charged when written
        self.keep: list[torch.Tensor] = []  # keeps ids unique during one forward

    def _width(self, t: torch.Tensor) -> int:
        return self.stored_width.get(id(t), self.element_bytes or t.element_size())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        namespace = func.namespace
        inputs = [
            a
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        ]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if namespace == "quantized_decomposed" and "dequantize" in func.__name__:
            for o in outputs:
                self.stored_width[id(o)] = inputs[0].element_size()
            self.keep += outputs
        elif namespace == "quantized_decomposed" and "quantize" in func.__name__:
            source = inputs[0]
            if id(source) in self.written:  # the producer really writes the quantized width
                self.total -= source.numel() * (
                    self.written[id(source)] - outputs[0].element_size()
                )
                self.written[id(source)] = outputs[0].element_size()
            self.keep += outputs
        elif not func.is_view and outputs:
            self.total += sum(t.numel() * self._width(t) for t in inputs)
            for o in outputs:
                width = self.element_bytes or o.element_size()
                self.total += o.numel() * width
                self.written[id(o)] = width
            self.keep += outputs
        return out


# torch.utils.flop_counter has no formula for attention as a CPU runs it: the fused op of
# nn.MultiheadAttention's inference fast path, and SDPA's CPU kernel, would count 0 MACs (a
# small ViT's baseline read 0.65x its real MACs, so dynamic INT8 looked like 1.49x them).
def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # shapes, as torch's own formula gets them


# Weight-only and INT8 kernels are matmuls of (M, K) activations into (M, N) outputs,
# however the weight is packed.
def _mm_flops(x, weight, *args, out_shape, **kwargs) -> int:
    return 2 * x[0] * x[1] * out_shape[1]  # shapes, as torch passes them


_CPU_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._weight_int8pack_mm: _mm_flops,
    torch.ops.aten._weight_int4pack_mm_for_cpu: _mm_flops,
    torch.ops.aten._int_mm: _mm_flops,  # torchao's per-token INT8
}


@contextlib.contextmanager
def flop_counter():
    """A ``FlopCounterMode`` that also counts attention and weight-only matmuls on the CPU.

    Example:
        >>> with torch.inference_mode(), flop_counter() as counter:
        ...     model(example)
        >>> counter.get_total_flops()
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the same matmuls, as countable ops
    try:
        with FlopCounterMode(display=False, custom_mapping=_CPU_FORMULAS) as counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count_memory_access(
    model: nn.Module, example: torch.Tensor, element_bytes: int | None = None
) -> int:
    """Bytes of weights and activations read and written per image (memory access cost)."""
    with torch.inference_mode(), _MemoryAccess(element_bytes) as counter:
        model(example)
    return counter.total // example.shape[0]


@contextlib.contextmanager
def _around_modules(modules: dict[str, nn.Module], before, after):
    """Call ``before(name, inputs)`` and ``after(name, output)`` around every module's
    forward while the block runs."""
    hooks = []
    for name, module in modules.items():
        hooks.append(module.register_forward_pre_hook(lambda _m, i, name=name: before(name, i)))
        hooks.append(module.register_forward_hook(lambda _m, _i, o, name=name: after(name, o)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def layer_costs(
    model: nn.Module,
    example: torch.Tensor,
    iterations: int = 20,
    element_bytes: int | None = None,
) -> list[dict]:
    """One row per module that does work of its own, in execution order; see the module doc.
    ``element_bytes`` is the evaluator's: the stored width of a quantized model's tensors.

    Example:
        >>> rows = layer_costs(model.eval(), data.example_input(1))
        >>> sum(r["macs"] for r in rows) == count_flops(model, data.example_input(1)) // 2
        True
    """
    walk = _Walk(model)
    with torch.inference_mode():
        with flop_counter() as flops_mode:
            flops = walk.own(example, flops_mode.get_total_flops)
        with _MemoryAccess(element_bytes) as memory:
            bytes_ = walk.own(example, lambda: memory.total)
        times, total_time = _own_times(walk, example, iterations)
    rows = []
    for name in walk.order:
        own_flops, own_bytes = flops.get(name, 0.0), bytes_.get(name, 0.0)
        module = walk.modules[name]
        own_params = sum(p.numel() for p in module.parameters(recurse=False))
        if not (own_flops or own_bytes or own_params):
            continue
        time_us = max(times.get(name, 0.0), 0.0)
        shape, positions = walk.shapes[name], walk.positions.get(name, 0)
        out_positions = _positions_of_shape(shape)
        rows.append(
            {
                "layer": name or "(model)",
                "type": type(module).__name__ + ("" if not walk.children[name] else " (own ops)"),
                "output": "x".join(str(d) for d in shape[1:]),
                "params": own_params,
                "macs": int(own_flops) // 2,
                "bytes": int(own_bytes),
                "intensity": own_flops / own_bytes if own_bytes else 0.0,
                "time_us": time_us,
                "time_share": time_us / total_time,
                "gflops": own_flops / (time_us * 1e3) if time_us else 0.0,
                # Fewer output positions than input positions: every later layer works on
                # this many times fewer (pooling, strides, patching).
                "downsamples": positions / out_positions
                if out_positions and positions > out_positions
                else 1.0,
            }
        )
    return rows


class _Walk:
    """One model's modules in the order a forward pass finishes them, with each one's output
    shape and input positions, and what a running counter adds inside each module alone
    (its children's share taken out)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.children = {
            name: [f"{name}.{c}" if name else c for c, _ in module.named_children()]
            for name, module in self.modules.items()
        }
        self.order: list[str] = []
        self.shapes: dict[str, tuple] = {}
        self.positions: dict[str, int] = {}

    def own(self, example: torch.Tensor, read) -> dict[str, float]:
        """What ``read()`` (a running counter) grows by inside each module, one forward."""
        inclusive: dict[str, float] = {}
        start: dict[str, list[float]] = {}

        def before(name, inputs):
            start.setdefault(name, []).append(read())
            if name not in self.positions:
                self.positions[name] = _positions(_first_tensor(inputs))

        def after(name, output):
            inclusive[name] = inclusive.get(name, 0.0) + read() - start[name].pop()
            if name not in self.shapes:
                self.order.append(name)
                out = _first_tensor(output)
                self.shapes[name] = tuple(out.shape) if out is not None else ()

        with _around_modules(self.modules, before, after):
            self.model(example)
        return self.exclusive(inclusive)

    def exclusive(self, inclusive: dict[str, float]) -> dict[str, float]:
        return {
            name: value - sum(inclusive.get(c, 0.0) for c in self.children[name])
            for name, value in inclusive.items()
        }


def _own_times(walk: _Walk, example: torch.Tensor, iterations: int) -> tuple[dict, float]:
    """Each module's own CPU time per call (µs) under torch.profiler, each module's calls
    labelled with record_function; and the whole model's."""
    model = walk.model
    for _ in range(3):
        model(example)
    open_labels: dict[str, list] = {}

    def enter(name, _inputs):
        label = record_function(LABEL + (name or "(model)"))
        label.__enter__()
        open_labels.setdefault(name, []).append(label)

    def leave(name, _output):
        open_labels[name].pop().__exit__(None, None, None)

    # Two profiled warm-up steps are discarded: the profiler's own first calls are slow.
    schedule = torch.profiler.schedule(wait=0, warmup=2, active=iterations, repeat=1)
    with (
        _around_modules(walk.modules, enter, leave),
        _quiet_native_stderr(),
        torch_profile(activities=[ProfilerActivity.CPU], schedule=schedule) as prof,
    ):
        for _ in range(iterations + 2):
            model(example)
            prof.step()
    inclusive_us = {
        e.key.removeprefix(LABEL): e.cpu_time_total / iterations
        for e in prof.key_averages()
        if e.key.startswith(LABEL)
    }
    inclusive_us = {("" if k == "(model)" else k): v for k, v in inclusive_us.items()}
    times = walk.exclusive(inclusive_us)
    return times, inclusive_us.get("", sum(times.values())) or 1.0


def _first_tensor(value):
    leaves = torch.utils._pytree.tree_leaves(value)
    return next((t for t in leaves if isinstance(t, torch.Tensor)), None)


def _positions(x: torch.Tensor | None) -> int:
    return _positions_of_shape(tuple(x.shape)) if x is not None else 0


def _positions_of_shape(shape: tuple) -> int:
    """Spatial positions (H·W) of an NCHW tensor, tokens of an NLC one, 1 otherwise."""
    if len(shape) == 4:
        return shape[2] * shape[3]
    if len(shape) == 3:
        return shape[1]
    return 1 if shape else 0


def profile_model(
    model: nn.Module, example: torch.Tensor, threads: int | None = None, iterations: int = 20
) -> dict:
    """The breakdown of :func:`layer_costs` against the machine's measured peaks.

    Adds per row whether it is compute- or memory-bound (intensity against the ridge
    point) and its achieved GFLOP/s as a share of what the roofline allows there; and for
    the whole model, the achieved GFLOP/s as a share of the FP32 (or INT8) peak.

    Example:
        >>> result = profile_model(model.eval(), data.example_input(1))
        >>> result["model"]["peak_share"]
    """
    peaks = machine_peaks(threads)
    about = traits(model)
    peak = _peak(peaks, model)
    ridge = peak / peaks["bandwidth_gbs"]
    rows = layer_costs(about.reference, example, iterations, about.element_bytes)
    for row in rows:
        row["bound"] = "memory" if row["intensity"] < ridge else "compute"
        roof = min(peak, row["intensity"] * peaks["bandwidth_gbs"])
        row["roof_share"] = row["gflops"] / roof if roof else 0.0
    total_flops = 2 * sum(r["macs"] for r in rows)
    total_bytes = sum(r["bytes"] for r in rows)
    total_us = sum(r["time_us"] for r in rows) or 1.0
    gflops = total_flops / (total_us * 1e3)
    note = None
    if about.compiled:
        note = (
            "compiled model: the rows come from its reference graph, so MACs and bytes are what"
            " it computes, but the times are the reference graph's, not the compiled kernels'"
        )
    return {
        "peaks": peaks,
        "note": note,
        "ridge_flops_per_byte": ridge,
        "layers": rows,
        "model": {
            "macs": total_flops // 2,
            "bytes": total_bytes,
            "intensity": total_flops / total_bytes if total_bytes else 0.0,
            "time_us": total_us,
            "gflops": gflops,
            "peak_share": gflops / peak,
            "compute_dtype": about.compute_dtype,
        },
    }


def _peak(peaks: dict, model: nn.Module) -> float:
    """The peak that applies to ``model``: INT8 GEMM for INT8 models, else FP32 GEMM."""
    int8 = traits(model).compute_dtype == "int8"
    return peaks["int8_gops"] if int8 else peaks["fp32_gflops"]


def profile_summary(
    model: nn.Module, example: torch.Tensor, gflops_per_s: float, threads: int
) -> dict:
    """What every report shows: the whole model's achieved GFLOP/s (from the evaluator's
    p50) as a share of the measured peak, and for eager models the costliest layers."""
    if traits(model).compiled:  # no per-layer timing of the kernels that run
        peaks = machine_peaks(threads)
        return {"peaks": peaks, "peak_share": gflops_per_s / _peak(peaks, model), "layers": None}
    result = profile_model(model, example, threads, iterations=10)
    return {
        "peaks": result["peaks"],
        "peak_share": gflops_per_s / _peak(result["peaks"], model),
        "ridge_flops_per_byte": result["ridge_flops_per_byte"],
        "model": result["model"],
        "layers": sorted(result["layers"], key=lambda r: r["time_us"], reverse=True)[:8],
    }
