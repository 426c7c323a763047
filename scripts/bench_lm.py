"""Language models side by side: decode speed, prefill latency, size and test loss of a GPT
in every runtime, compress's weight-only INT8/INT4 against the peers' own.

Contenders (the trained model of ``--recipe``'s baseline: the shipped reference of
``recipes/gpt_int8.yaml`` by default; nothing is downloaded):

- ``fp32_torch``, ``fp32_inductor`` (torch.compile, freezing; its decoding step compiled
  ahead of time by AOTInductor, as every ``*_inductor`` one), ``fp32_ort``, ``fp32_ov``:
  the float model in each runtime; OpenVINO in its own default precision (bf16 on CPUs with
  AVX-512 BF16 or AMX) and, where that is not f32, in f32 too (``*_ov_f32``): a decoding
  step can run faster in f32 kernels, so every OpenVINO contender gets both;
- ``compress_int8dyn``: compress's ``int8_dynamic`` on a model that decodes (torchao's
  per-token INT8, compiled); ``compress_int8wo_*``, ``compress_int4_*``: its
  ``int8_weight_only`` and ``int4_weight_only`` (torch's CPU weight-only kernels), eager
  and compiled, and the INT4 codes exported (``compress_int4_ort``: MatMulNBits;
  ``compress_int4_ov*``: OpenVINO's compressed weights, its activations quantized in the
  weights' groups of 64; ``int4_ov_group32``: the same in OpenVINO's default groups of 32,
  prefill only, the summary's ``int4_ov_prefill_x_activations_per_32``);
- ``torchao_int8wo``, ``torchao_int8dyn``: torchao's own ``Int8WeightOnlyConfig`` and
  ``Int8DynamicActivationInt8WeightConfig`` applied with ``quantize_``, compiled (torchao
  0.18 has no CPU int4 packing format);
- ``ort_int8dyn``, ``ort_int4``: ONNX Runtime's ``quantize_dynamic`` and 4-bit
  ``MatMulNBits`` of the float ONNX files;
- ``nncf_ov_int8``, ``nncf_ov_int4``: NNCF's ``compress_weights`` (INT8_ASYM; INT4_ASYM in
  groups of 64) on the OpenVINO model;
- with ``--run RUN_DIR``, ``chain_*``: that run's final model, eager, compiled and, where it
  exports (a float model), in both runtimes; the summary then sets its best decode and
  prefill against the best of the peers' INT8 (``torchao_int8*``, ``ort_int8dyn``,
  ``nncf_ov_int8``) of the unpruned model.

Decode: greedy tokens a second at batch 1 with a key/value cache, ``--new-tokens`` after a
prompt of ``context - new_tokens`` positions. Prefill: p50 of one forward pass over a
``context``-token prompt. Rounds alternate the contenders, in reverse order every other
round, so that a drift of the shared machine weighs on all alike; figures are medians over
rounds. Loss: nats per character on the test split's first ``--test-blocks`` blocks, the
same for every contender. One JSON line per contender, then one with the ratios the issue
sets targets on.

    python scripts/bench_lm.py
    python scripts/bench_lm.py --run runs/experiments/<stamp>/gpt_full --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from compress.core.distributed import set_threads
from compress.data import build_data
from compress.measure.decode import (
    decoding_step,
    empty_cache,
    has_decoder,
    onnx_step,
    openvino_precisions,
    tokens_per_second,
)
from compress.measure.deploy import export
from compress.measure.latency import measure_latency
from compress.measure.machine import describe_isa, isa
from compress.measure.runtimes import InductorModel, OnnxRuntimeModel, OpenVinoModel
from compress.measure.scores import metrics
from compress.stages.quantize import quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/gpt_int8.yaml"))
    parser.add_argument("--run", type=Path, help="a finished run folder: its final model too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-calls", type=int, default=20, help="timed calls per round")
    parser.add_argument("--test-blocks", type=int, default=300)
    args = parser.parse_args()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    threads = set_threads(args.threads)
    from compress.spec.recipe import load_recipe
    from compress.workflow.baseline import baseline_model

    recipe = load_recipe(args.run / "recipe.yaml" if args.run else args.recipe)
    data = build_data(recipe.data, seed=recipe.seed)
    baseline = baseline_model(recipe, data, "cpu").cpu().eval()
    folder = Path(tempfile.mkdtemp(prefix=f"bench-lm-{recipe.name}-"))
    contenders = _contenders(baseline, data, folder, threads, args)
    prompt = data.example_input(1)
    prefill = {name: [] for name, c in contenders.items() if c.get("forward") is not None}
    decode = {name: [] for name, c in contenders.items() if c.get("step") is not None}
    start = recipe.data.context - args.new_tokens
    for round_ in range(args.rounds):
        order = list(contenders.items())
        for name, c in order if round_ % 2 == 0 else order[::-1]:  # a drift weighs on all alike
            if name in prefill:
                prefill[name].append(
                    measure_latency(
                        c["forward"], prompt, warmup=2, iterations=args.prefill_calls
                    ).p50
                )
            if name in decode:
                cache = c["cache"]
                decode[name].append(tokens_per_second(c["step"], cache, start, args.new_tokens))
    scored = build_data(replace(recipe.data, test_subset=args.test_blocks), seed=recipe.seed)
    rows = {}
    for name, c in contenders.items():
        row = {"contender": name, "runtime": c["runtime"], "size_mb": c.get("size_mb")}
        if name in prefill:
            row["prefill_p50_ms"] = round(statistics.median(prefill[name]), 3)
        if name in decode:
            row["decode_tokens_per_s"] = round(statistics.median(decode[name]), 1)
        if c.get("forward") is not None and c.get("score", True):
            row["test_loss"] = round(metrics(c["forward"], scored)["loss"], 4)
        rows[name] = row
        print(json.dumps(row), flush=True)
    print(json.dumps(_summary(rows, recipe.name, threads, args)), flush=True)


PEER_INT8 = ("torchao_int8", "ort_int8", "nncf_ov_int8")  # the peers' own INT8, by name


def _summary(rows: dict, recipe: str, threads: int, args) -> dict:
    """The best of each family and the ratios against the float model's best runtime."""

    def best(prefix: str | tuple[str, ...], key: str, faster) -> str | None:
        found = [k for k in rows if k.startswith(prefix) and key in rows[k]]
        return faster(found, key=lambda k: rows[k][key]) if found else None

    summary: dict = {"recipe": recipe, "threads": threads, "rounds": args.rounds}
    summary["isa"] = describe_isa(isa())
    fp32_decode = best("fp32_", "decode_tokens_per_s", max)
    fp32_prefill = best("fp32_", "prefill_p50_ms", min)
    summary["best_fp32_decode"], summary["best_fp32_prefill"] = fp32_decode, fp32_prefill
    families = ("compress_int8dyn", "compress_int8wo", "compress_int4", "chain", "torchao")
    for family in (*families, "ort", "nncf"):
        decoder = best(family, "decode_tokens_per_s", max)
        if decoder and fp32_decode:
            ratio = rows[decoder]["decode_tokens_per_s"] / rows[fp32_decode]["decode_tokens_per_s"]
            summary[f"{family}_decode_x_best_fp32"] = round(ratio, 3)
            summary[f"{family}_best_decode"] = decoder
        forward = best(family, "prefill_p50_ms", min)
        if forward and fp32_prefill:
            ratio = rows[fp32_prefill]["prefill_p50_ms"] / rows[forward]["prefill_p50_ms"]
            summary[f"{family}_prefill_x_best_fp32"] = round(ratio, 3)
    if {"int4_ov_group32", "compress_int4_ov"} <= rows.keys():  # p50 in 64-groups / in 32-groups
        ratio = (
            rows["compress_int4_ov"]["prefill_p50_ms"] / rows["int4_ov_group32"]["prefill_p50_ms"]
        )
        summary["int4_ov_prefill_x_activations_per_32"] = round(ratio, 3)
    # The chain against the peers' best INT8 of the unpruned model (the issue's "best peer").
    peer_decode = best(PEER_INT8, "decode_tokens_per_s", max)
    peer_prefill = best(PEER_INT8, "prefill_p50_ms", min)
    chain_decode, chain_prefill = (
        best("chain", "decode_tokens_per_s", max),
        best("chain", "prefill_p50_ms", min),
    )
    if peer_decode and chain_decode:
        summary["best_peer_int8_decode"] = peer_decode
        ratio = rows[chain_decode]["decode_tokens_per_s"] / rows[peer_decode]["decode_tokens_per_s"]
        summary["chain_decode_x_best_peer_int8"] = round(ratio, 3)
    if peer_prefill and chain_prefill:
        summary["best_peer_int8_prefill"] = peer_prefill
        ratio = rows[peer_prefill]["prefill_p50_ms"] / rows[chain_prefill]["prefill_p50_ms"]
        summary["chain_prefill_x_best_peer_int8"] = round(ratio, 3)
    return summary


def _contenders(model, data, folder: Path, threads: int, args) -> dict[str, dict]:
    example = data.example_input(2)
    found: dict[str, dict] = {}
    _add_torch(found, "fp32", model, threads, folder, _saved_mb(model, folder / "fp32", example))
    _add_runtimes(found, "fp32", model, threads, folder, example)
    for method, label in (("int8_weight_only", "int8wo"), ("int4_weight_only", "int4")):
        options = {"group_size": 64} if method == "int4_weight_only" else {}
        quantized = quantize(model, data, method=method, **options)
        size = _saved_mb(quantized, folder / label, example)
        _add_torch(found, f"compress_{label}", quantized, threads, folder, size)
        if label == "int4":  # its codes in both runtimes (MatMulNBits, compressed weights)
            _add_runtimes(found, "compress_int4", quantized, threads, folder, example)
            # Its activations in OpenVINO's default groups of 32 rather than the weights' 64:
            # what compress's choice buys at prefill (named outside the family on purpose)
            found["int4_ov_group32"] = {
                "runtime": "openvino (activations per 32 inputs)",
                "forward": OpenVinoModel(
                    folder / "compress_int4.xml", threads, activation_group=32
                ),
                "size_mb": found["compress_int4_ov"]["size_mb"],
                "score": False,
            }
    per_token = quantize(model, data, method="int8_dynamic", goal="size")
    found["compress_int8dyn"] = {  # compiles itself; its decoding step compiled alike
        "runtime": "inductor",
        "forward": per_token,
        "step": decoding_step(per_token, "inductor", threads, folder / "compress_int8dyn"),
        "cache": empty_cache(per_token),
        "size_mb": _saved_mb(per_token, folder / "int8dyn", example),
    }
    _add_torchao(found, model, threads, folder)
    _add_peers(found, model, folder, threads)
    if args.run is not None:
        from compress.models.artifact import load

        chain = load(args.run / "model").eval()
        _add_torch(
            found, "chain", chain, threads, folder, _saved_mb(chain, folder / "chain", example)
        )
        if getattr(chain, "not_exportable", None) is None:  # its runtimes too
            _add_runtimes(found, "chain", chain, threads, folder, example)
    return found


def _add_torch(found: dict, name: str, model, threads: int, folder: Path, size_mb) -> None:
    decodes = has_decoder(model)
    for runtime, forward in (("torch", model), ("inductor", InductorModel(model))):
        step = decoding_step(model, runtime, threads, folder / name) if decodes else None
        found[f"{name}_{runtime}"] = {
            "runtime": runtime,
            "forward": forward,
            "step": step,
            "cache": empty_cache(model) if decodes else None,
            "size_mb": size_mb,
            "score": runtime == "torch",  # one loss per model: the compiled one is the same
        }


def _add_runtimes(found: dict, name: str, model, threads: int, folder: Path, example) -> None:
    """``model`` exported to both runtimes (the codes of a weight-only model), with its
    decoding step exported alike: ``{name}_ort``, ``{name}_ov`` and, where OpenVINO's default
    is a half precision, ``{name}_ov_f32`` too (a decoding step, one vector through every
    weight, can run faster in f32 kernels: each model gets both, like for like)."""
    onnx_file = export(model, folder / f"{name}.onnx", "onnx", example)
    xml = export(model, folder / f"{name}.xml", "openvino", example)
    variants = [("ort", "onnxruntime", OnnxRuntimeModel(onnx_file, threads), None)] + [
        ("ov" + (f"_{p}" if p else ""), "openvino", OpenVinoModel(xml, threads, p), p)
        for p in openvino_precisions()
    ]
    for suffix, runtime, forward, precision in variants:
        files = [forward.file] + ([xml.with_suffix(".bin")] if runtime == "openvino" else [])
        found[f"{name}_{suffix}"] = {
            "runtime": runtime if precision is None else f"{runtime} ({precision})",
            "forward": forward,
            "step": decoding_step(model, runtime, threads, folder / f"{name}_decoder", precision),
            "cache": empty_cache(model),
            "size_mb": round(sum(f.stat().st_size for f in files) / 1e6, 3),
            "score": precision is None,  # f32 scores as the original does
        }


def _add_torchao(found: dict, model, threads: int, folder: Path) -> None:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    for label, config in (
        ("int8wo", Int8WeightOnlyConfig()),
        ("int8dyn", Int8DynamicActivationInt8WeightConfig()),
    ):
        quantized = copy.deepcopy(model)
        quantize_(quantized, config)
        found[f"torchao_{label}"] = {
            "runtime": "inductor",
            "forward": InductorModel(quantized),
            "step": decoding_step(quantized, "inductor", threads, folder / f"torchao_{label}"),
            "cache": empty_cache(quantized),
            "size_mb": None,  # torchao's tensor subclasses save by pickle only
        }


def _add_peers(found: dict, model, folder: Path, threads: int) -> None:
    """ONNX Runtime's and NNCF's own weight quantization of the same float files."""
    from compress.measure.decode import export_decoder

    decoder_onnx = export_decoder(model.decoder(), folder / "fp32_decoder" / "decoder.onnx")
    for label, quantizer in (("int8dyn", _ort_dynamic), ("int4", _ort_int4)):
        forward = quantizer(folder / "fp32.onnx", folder / f"ort_{label}.onnx")
        step_file = quantizer(decoder_onnx, folder / f"ort_{label}_decoder.onnx")
        found[f"ort_{label}"] = {
            "runtime": "onnxruntime",
            "forward": OnnxRuntimeModel(forward, threads),
            "step": onnx_step(step_file, "onnxruntime", threads),
            "cache": empty_cache(model),
            "size_mb": round(forward.stat().st_size / 1e6, 3),
        }
    decoder_xml = folder / "float_decoder.xml"
    _to_openvino(decoder_onnx, decoder_xml)
    for label, options in (("int8", {}), ("int4", {"mode": "int4_asym", "group_size": 64})):
        forward = _nncf_weights(folder / "fp32.xml", folder / f"nncf_{label}.xml", options)
        step_file = _nncf_weights(decoder_xml, folder / f"nncf_{label}_decoder.xml", options)
        for precision in openvino_precisions():  # like compress's: its default and f32
            found[f"nncf_ov_{label}" + (f"_{precision}" if precision else "")] = {
                "runtime": "openvino" + (f" ({precision})" if precision else ""),
                "forward": OpenVinoModel(forward, threads, precision),
                "step": onnx_step(step_file, "openvino", threads, precision),
                "cache": empty_cache(model),
                "size_mb": round(forward.with_suffix(".bin").stat().st_size / 1e6, 3),
                "score": precision is None,
            }


def _ort_dynamic(source: Path, target: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    return target


def _ort_int4(source: Path, target: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=64, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    return target


def _to_openvino(source: Path, target: Path) -> None:
    import openvino as ov

    ov.save_model(ov.convert_model(str(source)), str(target), compress_to_fp16=False)


def _nncf_weights(source: Path, target: Path, options: dict) -> Path:
    import nncf
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.ERROR)  # its import resets it: tables on stdout
    mode = nncf.CompressWeightsMode(options.get("mode", "int8_asym"))
    extra = {"group_size": options["group_size"], "ratio": 1.0} if "group_size" in options else {}
    with contextlib.redirect_stdout(sys.stderr):  # progress bars: keep stdout JSON lines
        compressed = nncf.compress_weights(ov.Core().read_model(str(source)), mode=mode, **extra)
    ov.save_model(compressed, str(target), compress_to_fp16=False)
    return target


def _saved_mb(model, folder: Path, example: torch.Tensor) -> float:
    from compress.models.artifact import save

    save(model, folder, example)
    return round(sum(f.stat().st_size for f in folder.iterdir()) / 1e6, 3)


if __name__ == "__main__":
    main()
