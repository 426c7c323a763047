"""Decoding speed of a language model: new tokens a second at batch 1, one step at a time
with a key/value cache, in each runtime a model ships to.

A model that decodes has ``decoder()``: one step ``(ids (N, 1), position (1,), cache) ->
(logits, cache)`` over a cache of static shape (``compress.models.gpt.Decoder``). Every
step then costs the same whatever its position, so a timed run is the prompt's positions
filled by the same steps, then ``new_tokens`` greedy steps timed. The runtimes:
``torch`` (eager), ``inductor`` (AOTInductor, freezing on), and ONNX Runtime and
OpenVINO on the step exported to ONNX, the cache an input and the step's own keys and
values an output. Each runtime reads the cache where it lies (no copy in or out), and the
step's keys and values are written into it in place, as a deployed decoder keeps its cache.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from compress.core.errors import ExportError, first_line
from compress.core.modules import compile_module
from compress.core.stats import median_interval
from compress.measure.deploy import quiet_exporter
from compress.measure.latency import ROUND_WARMUP_S
from compress.measure.onnx_rewrite import WeightCodes, finish_export
from compress.measure.runtimes import OnnxRuntimeModel, OpenVinoModel, openvino_default_precision

DECODE_RUNTIMES = ("torch", "inductor", "onnxruntime", "openvino")
# (ids, position, cache) -> (logits, cache): the cache updated in place with the step's
# keys and values at ``position``.
Step = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def has_decoder(model: nn.Module) -> bool:
    """Whether ``model`` decodes step by step (it or its inner model has ``decoder()``)."""
    try:
        decoder = getattr(model, "decoder", None)
        return callable(decoder) and decoder() is not None
    except (AttributeError, TypeError):
        return False


def decoding_step(
    model: nn.Module,
    runtime: str,
    threads: int,
    folder: Path,
    precision: str | None = None,
    notes: list[str] | None = None,
) -> Step:
    """One decoding step of ``model`` in ``runtime``, on numpy arrays (ids, position, cache);
    ``precision``: OpenVINO's inference precision where not its default; ``notes`` gets what
    a reader should know of how it runs (a step inductor could not compile ahead of time).

    Example:
        >>> step = decoding_step(model, "onnxruntime", threads=2, folder=Path("/tmp/d"))
        >>> tokens_per_second(step, empty_cache(model), prompt=128, new_tokens=128)
    """
    decoder = getattr(model, "decoder")().eval()  # noqa: B009 - a method nn.Module types as Tensor
    if runtime in ("torch", "inductor"):
        run = decoder if runtime == "torch" else _compiled(decoder, folder, notes)

        def torch_step(ids, position, cache):
            with torch.inference_mode():
                logits, new = run(*(torch.from_numpy(a) for a in (ids, position, cache)))
            return logits.numpy(), _written(cache, new.numpy(), position)

        return torch_step
    reason = getattr(model, "not_exportable", None)
    if isinstance(reason, str):
        raise ExportError(f"{type(model).__name__} does not export: {reason}")
    exported = getattr(model, "export_module", None)  # its exportable form, where it has one
    codes = ()
    if callable(exported):
        module = exported()
        decoder, codes = module.decoder().eval(), getattr(module, "onnx_weight_codes", ())
    path = export_decoder(decoder, folder / "decoder.onnx", codes, runtime == "openvino")
    return onnx_step(path, runtime, threads, precision)


def openvino_precisions() -> list[str | None]:
    """The precisions a decoding step is timed in on OpenVINO: its default (None) and, where
    that is a half precision, f32, whose kernels can decode one vector at a time faster."""
    return [None] if openvino_default_precision() == "f32" else [None, "f32"]


def onnx_step(path: Path, runtime: str, threads: int, precision: str | None = None) -> Step:
    """The decoding step in ``path`` (ONNX, or OpenVINO IR) run by ONNX Runtime or OpenVINO
    (in ``precision``, such as "f32", where not OpenVINO's default).

    Example:
        >>> step = onnx_step(export_decoder(model.decoder(), Path("d.onnx")), "openvino", 2)
    """
    if runtime == "onnxruntime":
        session = OnnxRuntimeModel(path, threads).session

        def ort_step(ids, position, cache):
            logits, new = session.run(None, {"ids": ids, "position": position, "cache": cache})
            return logits, _written(cache, new, position)

        return ort_step
    if runtime == "openvino":
        request = OpenVinoModel(path, threads, precision).request

        def openvino_step(ids, position, cache):
            out = request.infer([ids, position, cache], share_inputs=True, share_outputs=True)
            logits, new = out.values()  # the request's own buffers, until its next call
            return logits.copy(), _written(cache, new, position)

        return openvino_step
    raise ValueError(f"decode runtime {runtime!r}: one of {', '.join(DECODE_RUNTIMES)}")


def _written(cache: np.ndarray, new: np.ndarray, position: np.ndarray) -> np.ndarray:
    cache[:, :, :, :, int(position[0])] = new[:, :, :, :, 0]  # compress.models.gpt.Decoder
    return cache


def _compiled(decoder: nn.Module, folder: Path, notes: list[str] | None):
    """The step compiled by inductor ahead of time (torch.export, then AOTInductor with
    freezing), as a deployed PyTorch decoder runs: without torch.compile's guards and
    wrappers at every call, which cost a step this small a third of its time (the 6-layer
    GPT's per-token INT8: 2,400 tokens/s through torch.compile, 3,900 ahead of time). A step
    that does not export goes through torch.compile, and a note says so."""
    try:
        return _ahead_of_time(decoder, folder)
    except Exception as error:  # noqa: BLE001 - export's and inductor's errors are many
        if notes is not None:
            notes.append(
                "inductor decodes through torch.compile: the step does not compile ahead of "
                f"time ({first_line(error)})"
            )
        return _just_in_time(decoder)


def _ahead_of_time(decoder: nn.Module, folder: Path):
    cache = decoder.empty_cache(1)  # type: ignore[operator]
    example = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]), cache)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(decoder, example)
        with torch._inductor.config.patch(freezing=True):
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=str(folder / "decoder.pt2")
            )
    return torch._inductor.aoti_load_package(package)


def _just_in_time(decoder: nn.Module):
    """The step through torch.compile, frozen at its first call (as InductorModel is)."""
    compiled = compile_module(decoder)
    first = [True]

    def run(*inputs):
        if not first[0]:
            return compiled(*inputs)
        first[0] = False
        with torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compiled(*inputs)

    return run


def empty_cache(model: nn.Module, batch: int = 1) -> np.ndarray:
    """The zero cache a decoding of ``batch`` sequences starts from."""
    return getattr(model, "decoder")().empty_cache(batch).numpy()  # noqa: B009 - as above


def tokens_per_second(step: Step, cache: np.ndarray, prompt: int, new_tokens: int) -> float:
    """Greedy new tokens a second after a ``prompt`` of positions (untimed) at batch 1.

    Untimed first, whatever the prompt: the first step (which compiles), and steps for at
    least ROUND_WARMUP_S, so that another runtime's spinning threads (ONNX Runtime's) have
    gone idle before the clock starts."""
    ids, first = np.zeros((1, 1), dtype=np.int64), np.array([0], dtype=np.int64)
    step(ids, first, cache)
    warm = time.perf_counter()
    while time.perf_counter() - warm < ROUND_WARMUP_S:
        step(ids, first, cache)
    for position in range(prompt):
        _, cache = step(ids, np.array([position], dtype=np.int64), cache)
    start = time.perf_counter()
    for position in range(prompt, prompt + new_tokens):
        logits, cache = step(ids, np.array([position], dtype=np.int64), cache)
        ids = logits[:, -1:].argmax(-1).astype(np.int64)
    return new_tokens / (time.perf_counter() - start)


def export_decoder(
    decoder: nn.Module, path: Path, codes: Sequence[WeightCodes] = (), openvino: bool = False
) -> Path:
    """Write the decoding step as ONNX: inputs ids, position, cache; outputs logits and the
    step's keys and values. ``codes``: weights the file stores as codes (weight-only models);
    ``openvino``: in the form OpenVINO converts (see ``finish_export``)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    example = (
        torch.zeros(1, 1, dtype=torch.long),
        torch.tensor([0]),
        decoder.empty_cache(1),  # type: ignore[operator]
    )
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                decoder.eval(),
                example,
                dynamo=True,
                input_names=["ids", "position", "cache"],
                output_names=["logits", "new"],
                external_data=False,
                verbose=False,
                report=False,
            )
    except Exception as error:  # noqa: BLE001 - the exporter's errors are many and long
        raise ExportError(f"the decoding step does not export: {first_line(error)}") from None
    if program is None:
        raise ExportError("the decoding step does not export: no program")
    import onnx

    proto = program.model_proto  # a new copy at each access: edit this one
    finish_export(proto, codes, openvino)
    onnx.save_model(proto, str(path))
    return path


class Decoding(NamedTuple):
    """A model's decoding step in one runtime, ready to time again (kept in memory only)."""

    step: Step
    cache: np.ndarray
    prompt: int
    new_tokens: int

    def rate(self) -> float:
        return tokens_per_second(self.step, self.cache, self.prompt, self.new_tokens)


def measure_decode(
    model: nn.Module, runtimes: list[str], threads: int, new_tokens: int, notes: list[str]
) -> tuple[dict[str, float], Decoding | None]:
    """Tokens a second (median of 3 rounds through them all) in each of ``runtimes`` that
    decodes, after a prompt filling the rest of the cache, and the fastest runtime's
    :class:`Decoding`; a runtime the step cannot reach is a note.

    OpenVINO decodes in its default precision and in f32, the faster kept (and named in a
    note): its default on CPUs with bf16 is bf16, and a decoding step, one vector through
    every weight, can run faster in f32 kernels (INT4/INT8 weights' ones included)."""
    context = empty_cache(model).shape[4]
    new_tokens = min(new_tokens, context)
    made: dict[str, list[Decoding]] = {}
    # The exported steps are read once, when their sessions are made: then removed.
    with tempfile.TemporaryDirectory(prefix="compress-decode-") as scratch:
        for runtime in (r for r in runtimes if r in DECODE_RUNTIMES):
            folder = Path(scratch) / runtime
            precisions = openvino_precisions() if runtime == "openvino" else [None]
            try:
                steps = [
                    decoding_step(model, runtime, threads, folder, p, notes) for p in precisions
                ]
            except ExportError as error:
                notes.append(f"decode not measured in {runtime}: {error}")
                continue
            prompt = context - new_tokens
            made[runtime] = [Decoding(s, empty_cache(model), prompt, new_tokens) for s in steps]
    # Every runtime's (and precision's) decoding in each round, the order reversed every
    # other round: a drift of this shared machine's speed then weighs on all of them alike.
    contenders = [
        (runtime, i) for runtime, decodings in made.items() for i in range(len(decodings))
    ]
    timed: dict[tuple[str, int], list[float]] = {contender: [] for contender in contenders}
    for round_ in range(3):
        for runtime, i in contenders if round_ % 2 == 0 else contenders[::-1]:
            timed[runtime, i].append(made[runtime][i].rate())
    rates: dict[str, float] = {}
    chosen: dict[str, Decoding] = {}
    for runtime, decodings in made.items():
        medians = [statistics.median(timed[runtime, i]) for i in range(len(decodings))]
        best = max(range(len(medians)), key=medians.__getitem__)
        rates[runtime], chosen[runtime] = medians[best], decodings[best]
        if best:
            default = openvino_default_precision()
            notes.append(
                f"OpenVINO decodes faster in f32 than in its default {default} here "
                f"({medians[best]:,.0f} against {medians[0]:,.0f} tokens/s): its decode is f32's"
            )
    fastest = max(rates, key=rates.__getitem__) if rates else None
    return rates, chosen[fastest] if fastest else None


def paired_decode_ratio(baseline: Decoding, model: Decoding, rounds: int) -> dict:
    """``model``'s tokens a second over ``baseline``'s from alternating rounds (the order
    alternating too): the median round ratio, its 95 % interval and the rounds.

    Example:
        >>> paired_decode_ratio(base_decoding, int8_decoding, rounds=5)["x"]
    """
    ratios = []
    for round_ in range(rounds):
        order = (baseline, model) if round_ % 2 == 0 else (model, baseline)
        rate = {id(d): d.rate() for d in order}
        ratios.append(rate[id(model)] / rate[id(baseline)])
    low, high = median_interval(ratios)
    return {"x": float(np.median(ratios)), "interval": [low, high], "rounds": rounds}
