"""This machine, as every report names it: CPU, ISA, threads, library versions; and what it
can do, measured: FP32 and INT8 GEMM peaks and copy bandwidth (the profile's roofline).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from compress.core import distributed
from compress.core.distributed import set_threads
from compress.core.paths import cache_dir
from compress.core.storage import write_atomic

# The CPU features that decide which runtime wins and what INT8 and bf16 gain: /proc/cpuinfo's
# flag -> the name a report prints. VNNI is the INT8 dot product (AVX-512 or AVX2 form);
# AMX the tile units that run INT8 and bf16 matmuls (Sapphire Rapids and later).
ISA_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx_vnni": "AVX-VNNI",
    "avx512_vnni": "AVX-512 VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_int8": "AMX INT8",
    "amx_bf16": "AMX BF16",
}


def isa(cpuinfo: str | None = None) -> list[str]:
    """The CPU features of :data:`ISA_FLAGS` this machine has (none where /proc/cpuinfo
    cannot be read).

    Example:
        >>> isa("flags : fpu avx2 avx512f avx512_vnni")
        ['AVX2', 'AVX-512', 'AVX-512 VNNI']
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in cpuinfo.splitlines()
            if line.startswith("flags") and ":" in line
        ),
        [],
    )
    return [name for flag, name in ISA_FLAGS.items() if flag in flags]


def describe_isa(features: list[str] | None) -> str:
    """The ISA as a report says it: "AVX2, AVX-512, AVX-512 VNNI; no AMX" ("" if unknown).

    Example:
        >>> describe_isa(["AVX2", "AVX-512", "AVX-512 VNNI"])
        'AVX2, AVX-512, AVX-512 VNNI; no AMX'
    """
    if not features:
        return ""
    amx = any(f.startswith("AMX") for f in features)
    return ", ".join(features) + ("" if amx else "; no AMX")


def environment(device: str = "cpu") -> dict:
    """Where the figures were measured: versions, device, threads, CPU."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torchao": importlib.metadata.version("torchao"),
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa": isa(),  # decides the INT8 and bf16 results: named in every report
        "cores_usable": distributed.usable_cores(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


@functools.cache
def channel_block() -> int | None:
    """How many channels ONNX Runtime's CPU convolutions run as one block on this machine (its
    NCHWc layout: 16 with AVX-512, 8 with AVX2), read from the runtime itself: the width it
    pads a 65-channel convolution's weights to, the next multiple of its block. None where
    ONNX Runtime is not installed or does not block. A layer pruned to a multiple of it keeps
    the blocked kernels; one left between blocks pays for the padding, or falls back to a
    slower layout.

    Example:
        >>> channel_block()
        16
    """
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    weight = onnx.numpy_helper.from_array(np.ones((65, 16, 1, 1), np.float32), "weight")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "weight"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 65, 8, 8])],
        [weight],
    )
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        options.log_severity_level = 3  # its warning that the file suits this CPU alone
        ort.InferenceSession(probe.SerializeToString(), options, ["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    padded = [int(t.dims[0]) for t in optimized.graph.initializer if len(t.dims) == 4]
    return padded[0] - 64 if padded and padded[0] > 65 else None


def machine_peaks(threads: int | None = None, refresh: bool = False) -> dict:
    """Measured peaks of this machine at ``threads``: FP32 GEMM GFLOP/s, INT8 GEMM GOP/s
    and copy bandwidth GB/s (read + write). Cached under the cache folder per CPU, thread
    count and torch version; ``refresh`` measures again.

    Example:
        >>> peaks = machine_peaks()
        >>> peaks["fp32_gflops"] / peaks["bandwidth_gbs"]   # the ridge point, FLOP per byte
    """
    threads = set_threads(threads)
    cpu = environment("cpu")["cpu"]
    key = hashlib.sha256(f"{cpu}|{threads}|{torch.__version__}|{platform.machine()}".encode())
    path = cache_dir() / "peaks" / f"{key.hexdigest()[:16]}.json"
    if path.is_file() and not refresh:
        return json.loads(path.read_text())
    peaks = {
        "cpu": cpu,
        "threads": threads,
        "fp32_gflops": _best_rate(lambda a, b: a @ b, torch.float32, 1024) / 1e9,
        # torch._int_mm: int8 x int8 -> int32, the oneDNN/MKL path INT8 layers use.
        "int8_gops": _best_rate(torch._int_mm, torch.int8, 1024) / 1e9,
        "bandwidth_gbs": _bandwidth() / 1e9,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_atomic(path, json.dumps(peaks, indent=1))
    return peaks


def _best_rate(matmul, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """Best of ``repeats`` multiply-adds per second of an n x n x n product."""
    if dtype.is_floating_point:
        a, b = torch.randn(n, n), torch.randn(n, n)
    else:
        a = torch.randint(-128, 127, (n, n), dtype=dtype)
        b = torch.randint(-128, 127, (n, n), dtype=dtype)
    matmul(a, b)  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _bandwidth(megabytes: int = 128, repeats: int = 3) -> float:
    """Bytes per second moved by a large copy (each byte read once and written once)."""
    source = torch.ones(megabytes * (1 << 20) // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best
