"""Rewrites of an exported ONNX graph that the exporter cannot express: dynamic INT8 as
ONNX's DynamicQuantizeLinear feeding integer matmuls, and biases of quantized layers
stored as int32 (as ONNX Runtime's and OpenVINO's own INT8 graphs have them); and what a
graph computes in (:func:`onnx_precision`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch


def dynamic_quantization_translations() -> dict:
    """ONNX for the ops of a dynamic INT8 graph, which the exporter has no translation for:
    torchao's ``choose_qparams`` (the scale and zero point of a tensor, at run time) is
    ONNX's DynamicQuantizeLinear, whose quantized output :func:`dynamic_matmuls` then uses.
    """
    from onnxscript import opset18 as op

    def choose_qparams(x, quant_min, quant_max, eps, dtype):
        _, scale, zero_point = op.DynamicQuantizeLinear(x)
        return scale, zero_point

    def quantize(x, scale, zero_point, quant_min, quant_max, dtype):
        return op.QuantizeLinear(x, scale, zero_point)

    def dequantize(x, scale, zero_point, quant_min, quant_max, dtype, out_dtype=None):
        return op.DequantizeLinear(x, scale, zero_point)

    ops = torch.ops.quantized_decomposed
    if not hasattr(ops, "choose_qparams"):
        # Registered when torchao's PT2E flow is imported; a process that only loads and
        # exports a float model has none of these ops in its graphs.
        return {}
    return {
        ops.choose_qparams.tensor: choose_qparams,
        ops.quantize_per_tensor.tensor: quantize,
        ops.dequantize_per_tensor.tensor: dequantize,
    }


def finish_export(model, weight_codes: Sequence[WeightCodes] = (), openvino: bool = False) -> None:
    """What every exported ONNX graph gets before it is saved: dynamic INT8 in ONNX's form,
    int32 biases of quantized layers, a weight-only model's codes in place of its float
    weights; and, for OpenVINO, symmetric weights without their zero points and 4-bit codes
    in blocks that tile each row (each rewrite leaves a graph without its pattern as it is)."""
    dynamic_matmuls(model)
    quantize_biases(model)
    weight_code_matmuls(model, weight_codes, whole_blocks=openvino)
    if openvino:
        drop_zero_weight_zero_points(model)


def dynamic_matmuls(model) -> int:
    """Rewrite ``DynamicQuantizeLinear → DQ → Gemm(DQ(int8 weight))`` as ONNX's dynamic
    INT8 form, ``MatMulInteger`` then a float rescale (and bias), which ONNX Runtime fuses
    into one DynamicQuantizeMatMul kernel; returns how many Linear layers it rewrote.

    The exporter types the run-time scale and zero point as torch has them (float64,
    int64); ONNX's are float32 and uint8, so those declarations are dropped.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    dynamic = {n.output[1]: n for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    if not dynamic:
        return 0
    runtime_values = {o for n in dynamic.values() for o in n.output}
    for info in [v for v in graph.value_info if v.name in runtime_values]:
        graph.value_info.remove(info)
    values = {i.name: i for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    rewritten, replacement = 0, {}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == attrs.get("beta", 1.0) == 1.0
        )
        if node.op_type != "Gemm" or not plain:
            continue
        x, w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (x and w and x.op_type == w.op_type == "DequantizeLinear"):
            continue
        source = dynamic.get(x.input[1])
        if source is None or w.input[0] not in values or w.input[1] not in values:
            continue
        weight = numpy_helper.to_array(values[w.input[0]])
        weight = weight.T if attrs.get("transB", 0) else weight  # K x N for MatMulInteger
        name = node.name or node.output[0]
        w_scale = numpy_helper.to_array(values[w.input[1]]).astype(np.float32).reshape(-1)
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(weight), f"{name}_weight_kn"),
                numpy_helper.from_array(
                    np.zeros(weight.shape[1], dtype=weight.dtype), f"{name}_weight_zero_point"
                ),
                numpy_helper.from_array(w_scale, f"{name}_weight_scale"),
            ]
        )
        out = node.output[0]
        nodes = [
            helper.make_node(
                "MatMulInteger",
                [
                    source.output[0],
                    f"{name}_weight_kn",
                    source.output[2],
                    f"{name}_weight_zero_point",
                ],
                [f"{name}_int32"],
            ),
            helper.make_node("Cast", [f"{name}_int32"], [f"{name}_float"], to=1),
            helper.make_node("Mul", [source.output[1], f"{name}_weight_scale"], [f"{name}_scale"]),
            helper.make_node(
                "Mul",
                [f"{name}_float", f"{name}_scale"],
                [f"{name}_scaled" if len(node.input) > 2 and node.input[2] else out],
            ),
        ]
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [f"{name}_scaled", node.input[2]], [out]))
        replacement[id(node)] = nodes
        rewritten += 1
    if rewritten:
        ordered = []
        for node in graph.node:
            ordered += replacement.get(id(node), [node])
        del graph.node[:]
        graph.node.extend(ordered)
        _drop_dead_nodes(graph)
    return rewritten


def _drop_dead_nodes(graph) -> None:
    """Remove nodes and initializers nothing reads (the float paths a rewrite replaced)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {name for n in graph.node for name in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for n in graph.node for name in n.input}
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)


def drop_zero_weight_zero_points(model) -> int:
    """Remove the all-zero zero point of every DequantizeLinear of a constant (symmetric
    weights, int32 biases): ONNX's default is zero of the codes' type, so the graph computes
    the same. OpenVINO keeps an explicit one as a ``Subtract`` on the weight path, and
    ConvNeXt's convolutions and Linear layers then ran in bf16 on weights decompressed each
    call, where without it all ran INT8 (1.28x faster, level with NNCF's graph); returns how
    many it removed. Not for ONNX Runtime: its QGemm fusion wants the zero point (a Gemm
    stayed float without it)."""
    from onnx import numpy_helper

    graph = model.graph
    values = {i.name: i for i in graph.initializer}
    dropped = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or not node.input[2]:
            continue
        codes, zero = values.get(node.input[0]), values.get(node.input[2])
        if codes is None or zero is None or zero.data_type != codes.data_type:
            continue
        if not numpy_helper.to_array(zero).any():
            del node.input[2]
            dropped += 1
    if dropped:
        _drop_dead_nodes(graph)
    return dropped


def quantize_biases(model) -> int:
    """Give every Conv/Gemm whose input and weight are dequantized an int32 bias behind a
    DequantizeLinear (scale = input scale x weight scale, zero point 0); returns how many.

    ONNX Runtime's QDQ selector fuses DQ → Conv → Q into QLinearConv only when all inputs
    are dequantized; a float bias leaves the Conv in float. int32 at that scale is exact to
    within half a quantization step of the accumulator, as in ONNX Runtime's own quantizer.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    values = {i.name: i for i in graph.initializer}
    constants = {
        n.output[0]: n.attribute[0].t
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }

    def constant(name: str) -> np.ndarray | None:
        tensor = values.get(name) or constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    producer = {out: n for n in graph.node for out in n.output}
    added = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        x, w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (x and w and x.op_type == w.op_type == "DequantizeLinear"):
            continue
        if node.op_type == "Gemm" and any(
            a.name == "transB" and a.i == 0 for a in node.attribute
        ):  # the weight's scales would run along the wrong axis
            continue
        bias, x_scale, w_scale = (
            constant(node.input[2]),
            constant(x.input[1]),
            constant(w.input[1]),
        )
        if bias is None or x_scale is None or w_scale is None or x_scale.size != 1:
            continue
        scale = (float(x_scale.reshape(())) * w_scale.astype(np.float64)).reshape(-1)
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
        codes = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        name = f"{node.input[2]}_int32"
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes, name),
                numpy_helper.from_array(scale, f"{name}_scale"),
                numpy_helper.from_array(np.zeros_like(codes), f"{name}_zero_point"),
            ]
        )
        added.append(
            helper.make_node(
                "DequantizeLinear",
                [name, f"{name}_scale", f"{name}_zero_point"],
                [f"{name}_dequantized"],
                axis=0,
            )
        )
        node.input[2] = f"{name}_dequantized"
    if added:  # nodes are topologically sorted: the new ones read initializers only
        nodes = added + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_dead_nodes(graph)  # the float biases, now stored as int32
    return len(added)


@dataclass(frozen=True)
class WeightCodes:
    """A Linear weight stored as integer codes: ``(codes - zeros) * scales`` per group of
    ``group`` inputs (INT8: one group, no zeros), and the float weight they stand for. What
    a weight-only model hands the exporter, so that its ONNX file holds the codes."""

    bits: int  # 4 (codes 0..15, unsigned) or 8 (codes -127..127, signed)
    codes: np.ndarray  # (out, in), one code per element
    scales: np.ndarray  # (out, groups), float32
    zeros: np.ndarray | None  # (out, groups) codes, or None for symmetric codes
    group: int  # inputs per scale
    weight: np.ndarray  # (out, in) float32: the float weight the exported file holds


def weight_code_matmuls(model, weights: Sequence[WeightCodes], whole_blocks: bool = False) -> int:
    """Store each MatMul's constant weight that is one of ``weights`` (as the exporter
    folded it: transposed, float) as its codes behind a DequantizeLinear; returns how many.

    INT8 codes are per output channel (``axis=1`` of the K x N weight); INT4 codes are
    ``uint4`` in blocks of ``group`` inputs (opset 21's blocked DequantizeLinear), the form
    ONNX Runtime fuses into its 4-bit ``MatMulNBits`` kernel and OpenVINO keeps compressed.
    The float file's weights are matched by value, so any exporter's names do.
    ``whole_blocks``: blocks that tile a row (OpenVINO converts no shorter last block).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    # (transposed, shape, bytes) -> codes: K x N as MatMul (and Gemm) take it, or N x K as
    # Gemm with transB does; the node's own orientation picks which to look for.
    by_value = {}
    for layer in weights:
        for transposed in (True, False):
            folded = np.ascontiguousarray(layer.weight.T if transposed else layer.weight)
            by_value[(transposed, folded.shape, folded.tobytes())] = layer
    values = {i.name: i for i in graph.initializer}
    added: list = []
    four_bit = False
    for node in graph.node:
        initializer = values.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") else None
        if initializer is None or initializer.data_type != TensorProto.FLOAT:
            continue
        weight = np.ascontiguousarray(numpy_helper.to_array(initializer))
        transposed = not any(a.name == "transB" and a.i for a in node.attribute)
        codes = by_value.get((transposed, weight.shape, weight.tobytes()))
        if codes is None:
            continue
        name = f"{initializer.name}_codes{len(added)}"
        orient = (lambda a: a.T) if transposed else (lambda a: a)
        out_axis = 1 if transposed else 0
        inputs = [name, f"{name}_scale"]
        if codes.bits == 8:
            stored = [
                numpy_helper.from_array(
                    np.ascontiguousarray(orient(codes.codes).astype(np.int8)), name
                ),
                numpy_helper.from_array(codes.scales.reshape(-1).astype(np.float32), inputs[1]),
            ]
            attributes = {"axis": out_axis}
        else:
            assert codes.zeros is not None, "4-bit codes are asymmetric"
            if whole_blocks:
                codes = _whole_blocks(codes)
            stored = [
                _uint4(name, orient(codes.codes)),
                numpy_helper.from_array(
                    np.ascontiguousarray(orient(codes.scales).astype(np.float32)), inputs[1]
                ),
                _uint4(f"{name}_zero", orient(codes.zeros)),
            ]
            inputs.append(f"{name}_zero")
            attributes = {"axis": 1 - out_axis, "block_size": codes.group}
            four_bit = True
        graph.initializer.extend(stored)
        node.input[1] = f"{name}_float"
        added.append(helper.make_node("DequantizeLinear", inputs, [node.input[1]], **attributes))  # type: ignore[arg-type]
    if added:  # the new nodes read initializers only: first in the graph is in order
        nodes = added + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_dead_nodes(graph)  # the float weights
    if four_bit:  # blocked and 4-bit DequantizeLinear came with opset 21
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, 21)
    return len(added)


def _whole_blocks(codes: WeightCodes) -> WeightCodes:
    """``codes`` in blocks that tile each row: where ``group`` does not divide the inputs
    (784 in groups of 32), blocks of their greatest common divisor, each with its group's
    scale and zero point, so the codes and what they stand for are the same."""
    inputs = codes.codes.shape[1]
    block = math.gcd(inputs, codes.group)
    if block == codes.group:
        return codes
    repeat = codes.group // block
    blocks = inputs // block
    assert codes.zeros is not None  # 4-bit codes: the only blocked ones
    return replace(
        codes,
        scales=np.repeat(codes.scales, repeat, axis=1)[:, :blocks],
        zeros=np.repeat(codes.zeros, repeat, axis=1)[:, :blocks],
        group=block,
    )


def _uint4(name: str, values: np.ndarray):
    """A uint4 initializer: two codes per byte, the first in the low half."""
    from onnx import TensorProto, helper

    flat = values.astype(np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, 0)
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.UINT4, values.shape, packed.tobytes(), raw=True)


def onnx_precision(path: str | Path) -> str:
    """What an ONNX file computes in: int8 (QDQ or dynamic), float16 or float32, with
    "(int4 weights)" or "(int8 weights)" where weights alone are codes.

    Example:
        >>> onnx_precision("runs/resnet_int8/quantize.onnx")
        'int8'
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    if ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"}:
        return "int8"
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer):
        return "float16"
    types = {i.data_type for i in graph.initializer}
    for code, bits in ((onnx.TensorProto.UINT4, 4), (onnx.TensorProto.INT8, 8)):
        if "DequantizeLinear" in ops and code in types:
            return f"float32 (int{bits} weights)"
    return "float32"
