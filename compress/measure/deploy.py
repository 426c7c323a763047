"""Deployment: export a model to ONNX or OpenVINO IR, and run it in the runtime it ships to.

``export(model, path, format)`` writes the file a runtime loads; ``deployed(model,
runtime, ...)`` returns a module that runs the model in that runtime (ONNX Runtime,
OpenVINO, or PyTorch with inductor), so the shared evaluator measures every deployment
with the same code. onnx, onnxscript, onnxruntime and openvino are the optional extra
``compress[deploy]``; without them the evaluator measures PyTorch alone and says so.

INT8 graphs export as QDQ around Conv/Gemm, the form both runtimes fuse into integer
kernels; ``onnx_rewrite.finish_export`` adds what the exporter does not (int32 biases,
dynamic INT8's form, a weight-only model's codes)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.core.errors import ExportError, first_line
from compress.core.traits import traits
from compress.measure.onnx_rewrite import dynamic_quantization_translations, finish_export
from compress.measure.runtimes import InductorModel, OnnxRuntimeModel, OpenVinoModel
from compress.models.artifact import MAX_BATCH, recorded_input  # the batches saved ones take
from compress.models.detector import SplitDetector, split_detector

# Where the evaluator can measure a model. ``torch``: the model as ``model(x)`` runs it
# (eager for float models; INT8 models compile themselves); ``inductor``: a float model
# through torch.compile with freezing, PyTorch's own best deployment on a CPU.
RUNTIMES = ("torch", "inductor", "onnxruntime", "openvino")
FORMATS = {"onnx": ".onnx", "openvino": ".xml"}
_RUNTIME_PACKAGES = {
    "onnxruntime": ("onnx", "onnxscript", "onnxruntime"),
    "openvino": ("onnx", "onnxscript", "openvino"),
}


def available_runtimes() -> list[str]:
    """The runtimes whose packages are installed, in :data:`RUNTIMES` order."""
    return [
        r
        for r in RUNTIMES
        if all(importlib.util.find_spec(p) is not None for p in _RUNTIME_PACKAGES.get(r, ()))
    ]


def missing_runtimes() -> list[str]:
    """The runtimes of :data:`RUNTIMES` whose packages are not installed."""
    return [r for r in RUNTIMES if missing_packages(r)]


def missing_packages(runtime: str) -> list[str]:
    return [p for p in _RUNTIME_PACKAGES.get(runtime, ()) if importlib.util.find_spec(p) is None]


def export(
    model: nn.Module, path: str | Path, format: str = "onnx", example: torch.Tensor | None = None
) -> Path:
    """Write ``model`` as an ONNX file or an OpenVINO IR (``.xml`` + ``.bin``) at ``path``.

    ``example`` is one input batch (its shape fixes everything but the batch size, which
    stays dynamic). A path without the format's suffix (``.onnx``, ``.xml``) gets it; an
    existing file is never overwritten. Returns the path written.

    Example:
        >>> export(int8_model, "deploy/model.onnx", "onnx", data.example_input(1))
        >>> export(int8_model, "deploy/model.xml", "openvino", data.example_input(1))
    """
    if format not in FORMATS:
        raise ExportError(f"format {format!r} is not one of: {', '.join(FORMATS)}")
    runtime = "onnxruntime" if format == "onnx" else "openvino"
    missing = missing_packages(runtime)
    if missing:
        raise ExportError(
            f"exporting to {format} needs {', '.join(missing)}: pip install 'compress[deploy]'"
        )
    path = Path(path)
    if path.suffix != FORMATS[format]:
        path = path.with_suffix(FORMATS[format])
    if path.exists():
        raise ExportError(f"{path} already exists; compress never overwrites a file")
    if example is None:
        example = _example_from_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.export-") as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        _export_onnx(model, onnx_file, example, format)
        if format == "onnx":
            os.replace(onnx_file, path)
        else:
            _convert_to_openvino(onnx_file, path)
    return path


def _convert_to_openvino(onnx_file: Path, xml: Path) -> None:
    """OpenVINO's own converter, ONNX → IR, written beside ``xml`` and renamed into place."""
    import openvino as ov

    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=f".{xml.stem}.convert-") as tmp:
        staged = Path(tmp) / xml.name
        try:
            converted = ov.convert_model(str(onnx_file))
        except Exception as error:  # noqa: BLE001 - the converter's errors are long
            raise ExportError(f"openvino cannot convert {onnx_file}: {first_line(error)}") from None
        ov.save_model(converted, str(staged), compress_to_fp16=False)
        # The .xml names its .bin; the .bin lands first so that a visible .xml is complete.
        os.replace(staged.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(staged, xml)


def deployed(
    model: nn.Module,
    runtime: str,
    threads: int,
    example: torch.Tensor,
    stem: str | Path | None = None,
) -> nn.Module:
    """``model`` as ``runtime`` runs it: a module taking and returning CPU tensors.

    For ONNX Runtime and OpenVINO the model is exported first, to ``<stem>.onnx`` or
    ``<stem>.xml`` (+ ``.bin``) when ``stem`` is given, else into a temporary folder; an
    existing ``<stem>.onnx`` is what OpenVINO converts. The module's ``file`` names what it
    runs. Raises :class:`ExportError` with one line when it cannot.

    Example:
        >>> ov_model = deployed(int8_model, "openvino", threads=2, example=x)
        >>> ov_model(x).argmax(1)
    """
    split = split_detector(model)  # a detector's network deploys; NMS and the rest stay torch's
    if split is not None and runtime != "torch":
        network = deployed(split.network, runtime, threads, split.resized(example), stem)
        return SplitDetector(split.detector, network)
    if runtime == "torch":
        return split or model
    if runtime == "inductor":
        return InductorModel(model)
    if runtime not in RUNTIMES:
        raise ExportError(f"runtime {runtime!r} is not one of: {', '.join(RUNTIMES)}")
    missing = missing_packages(runtime)
    if missing:
        raise ExportError(f"{runtime} is not installed ({', '.join(missing)} missing)")
    scratch = None
    if stem is None:  # removed with the returned module
        scratch = tempfile.TemporaryDirectory(prefix="compress-deploy-")
        stem = Path(scratch.name) / "model"
    stem = Path(stem)
    onnx_file = stem.parent / f"{stem.name}.onnx"
    precision = _OPENVINO_PRECISION.get(getattr(model, "dtype", torch.float32))
    if runtime == "onnxruntime":
        if getattr(model, "dtype", None) == torch.bfloat16:
            raise ExportError("onnxruntime's CPU kernels take no bfloat16 (OpenVINO's do)")
        if not onnx_file.exists():
            export(model, onnx_file, "onnx", example)
        module: OnnxRuntimeModel | OpenVinoModel = OnnxRuntimeModel(onnx_file, threads)
    else:
        xml = stem.parent / f"{stem.name}.xml"
        if not xml.exists():
            if onnx_file.exists() and precision is None:
                _convert_to_openvino(onnx_file, xml)
            else:
                export(model, xml, "openvino", example)
        module = OpenVinoModel(xml, threads, precision)
    module.scratch = scratch  # type: ignore[assignment]  # a directory, kept while it runs
    return module


def deployed_files(path: Path) -> list[Path]:
    """The files a runtime reads for ``path`` (an OpenVINO IR is two)."""
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


# OpenVINO runs FP16/BF16 models as float32 IR with its own inference precision: its ONNX
# front end takes no bfloat16 graph, and its CPU plugin casts per layer as it sees fit.
_OPENVINO_PRECISION = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _deployable_module(model: nn.Module, format: str) -> nn.Module:
    """What to export: a quantized model's converted graph (QDQ ops, int8 weights) rather
    than its compiled wrapper; for OpenVINO, a half-precision model's float32 original;
    any other model as it is."""
    reason = getattr(model, "not_exportable", None)  # a model that says why it cannot
    if isinstance(reason, str):
        raise ExportError(f"{type(model).__name__} does not export: {reason}")
    export_module = getattr(model, "export_module", None)  # a model's own exportable form
    if callable(export_module):
        return cast(nn.Module, export_module())
    if format == "openvino" and getattr(model, "dtype", None) in _OPENVINO_PRECISION:
        return copy.deepcopy(cast(nn.Module, model.inner)).float()
    about = traits(model)
    if about.compiled:
        return about.reference
    parametrized = [m for m in model.modules() if parametrize.is_parametrized(m)]
    if not parametrized:
        return model
    # Weight sharing keeps weights on a codebook through parametrizations; a deployed model
    # holds the weights they compute.
    model = copy.deepcopy(model)
    for module in model.modules():
        for name in list(getattr(module, "parametrizations", {})):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def _example_from_model(model: nn.Module) -> torch.Tensor:
    """Zeros of the input ``model`` says it takes, or its graph recorded: float images, or
    token id 0 for a language model (integer ids)."""
    found = recorded_input(model)
    if found is None:
        raise ExportError(
            f"{type(model).__name__}: the input shape is unknown; pass an example input"
        )
    shape, dtype = found
    return torch.zeros(1, *shape, dtype=dtype)


def _export_onnx(model: nn.Module, path: Path, example: torch.Tensor, format: str) -> None:
    import onnx

    module = _deployable_module(model, format).cpu()
    example = example.cpu()
    if example.shape[0] == 1:  # a batch of 1 would be specialised to 1
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
                report=False,
                custom_translation_table=dynamic_quantization_translations(),
            )
    except Exception as error:  # noqa: BLE001 - the exporter's errors are many and long
        raise ExportError(
            f"{type(model).__name__} does not export to ONNX: {first_line(error)}"
        ) from None
    if program is None:
        raise ExportError(f"{type(model).__name__} does not export to ONNX: no program")
    proto = program.model_proto  # a new copy at each access: edit this one
    finish_export(proto, getattr(module, "onnx_weight_codes", ()), openvino=format == "openvino")
    onnx.save_model(proto, str(path))


@contextlib.contextmanager
def quiet_exporter():
    """The ONNX exporter without its chatter: it logs every pass at INFO and prints its
    progress on stdout (and, failing, the whole graph on stderr); a run's log keeps its own
    lines, and a failure is one line.

    Example:
        >>> with quiet_exporter():
        ...     program = torch.onnx.export(model, (x,), dynamo=True)
    """
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
