"""Deployment: every stage's output exports to ONNX and OpenVINO and runs there as in torch;
INT8 exports in the QDQ form ONNX Runtime fuses into integer kernels; the evaluator's
headline is the fastest runtime; what cannot export says so in one line."""

import collections
import copy
import json

import onnx
import onnxruntime as ort
import pytest
import torch

from compress.core.errors import RecipeError
from compress.core.registry import STAGES, StageContext
from compress.measure import deploy
from compress.measure.counts import sqnr_db
from compress.measure.deploy import ExportError, deployed, export
from compress.measure.evaluate import EvaluateConfig, evaluate
from compress.measure.runtimes import InductorModel, OnnxRuntimeModel, OpenVinoModel
from compress.models.artifact import save
from compress.models.build import build_model
from compress.spec.recipe import ModelConfig, parse_recipe, parse_stage_options
from compress.stages.quantize import quantize
from compress.workflow.pipeline import run as compress_run
from tests.conftest import run_cli
from tests.test_stages import QUICK

# Per stage kind (the quantize methods listed apart): the SQNR floor (dB) of the runtime's
# logits against torch's. Float exports agree to rounding; INT8 runtimes round activations
# their own way at a few places, OpenVINO runs float models in bf16 on AMX CPUs.
KINDS = {
    **{kind: (QUICK[kind], 25.0) for kind in STAGES if kind != "quantize"},
    "quantize:int8_static": (
        {"method": "int8_static", "goal": "size", "calibration_batches": 2},
        20.0,
    ),
    "quantize:int8_dynamic": ({"method": "int8_dynamic", "goal": "size"}, 25.0),
    "quantize:fp16": ({"method": "fp16"}, 25.0),
    "quantize:int4_weight_only": ({"method": "int4_weight_only", "group_size": 32}, 25.0),
    "quantize:int8_weight_only": ({"method": "int8_weight_only"}, 35.0),
}


def _stage(kind, model, data):
    stage = kind.split(":")[0]
    config = parse_stage_options(stage, KINDS[kind][0])
    return STAGES[stage].function(model, data, config, context=StageContext(baseline=model))


@pytest.mark.slow  # exports and compiles in two runtimes per kind
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_stage_kind_runs_in_each_runtime_as_in_torch(kind, trained_tiny, fmnist, tmp_path):
    model = _stage(kind, trained_tiny, fmnist)
    images = fmnist.example_input(64)
    # An INT8 model's own graph, op by op: the graph that is exported, without the 5-25 s
    # of compiling it here (the compiled kernels are tested in test_quantize).
    reference = getattr(model, "reference_module", model)
    with torch.inference_mode():
        expected = reference(images).float()
    for runtime in ("onnxruntime", "openvino"):  # OpenVINO converts the same ONNX file
        in_runtime = deployed(model, runtime, 1, images[:2], tmp_path / "model")
        with torch.inference_mode():
            got = in_runtime(images)
        assert got.shape == expected.shape  # the batch dimension stays dynamic
        assert sqnr_db(expected, got) >= KINDS[kind][1], runtime
        assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.95, runtime


@pytest.mark.slow
def test_int8_exports_as_qdq_that_onnxruntime_fuses(trained_tiny, fmnist, tmp_path):
    int8 = quantize(trained_tiny, fmnist, method="int8_static", goal="size", calibration_batches=2)
    path = export(int8, tmp_path / "model.onnx", "onnx", fmnist.example_input(2))
    graph = onnx.load(str(path)).graph
    producers = {out: n.op_type for n in graph.node for out in n.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == 4
    for node in convs:  # input, int8 weight and int32 bias all dequantized
        assert [producers.get(name) for name in node.input] == ["DequantizeLinear"] * 3
    weights = {i.name: i.data_type for i in graph.initializer}
    assert onnx.TensorProto.INT8 in weights.values() and onnx.TensorProto.INT32 in weights.values()
    assert onnx.TensorProto.FLOAT not in {
        weights[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in weights
    }
    # ONNX Runtime's own optimiser turns every Conv/Gemm into an integer kernel.
    ops = _ops_onnxruntime_runs(path, tmp_path)
    assert ops["Conv"] == ops["Gemm"] == 0
    assert ops["QLinearConv"] == 3 and ops["QGemm"] + ops["QLinearMatMul"] == 1


class _ConvNextBlock(torch.nn.Module):
    """ConvNeXt's block: depthwise 7x7, then LayerNorm and an MLP on channels-last."""

    def __init__(self, width: int):
        super().__init__()
        self.depthwise = torch.nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
        )

    def forward(self, x):
        y = self.norm(self.depthwise(x).permute(0, 2, 3, 1))
        return x + self.mlp(y).permute(0, 3, 1, 2)


@pytest.mark.slow
def test_int8_convolutions_and_linears_run_int8_in_openvino(fmnist, tmp_path):
    """Weights' all-zero zero points are left out of OpenVINO's file: it kept them as a
    Subtract on the weight path, and ran this ConvNeXt block's layers in bf16 on weights
    decompressed at each call, NNCF's graph of the same model in INT8."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 4, stride=4),
        _ConvNextBlock(32),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    ).eval()
    int8 = quantize(model, fmnist, method="int8_static", goal="size", calibration_batches=2)
    path = export(int8, tmp_path / "model.xml", "openvino", fmnist.example_input(2))
    import openvino

    graph = openvino.Core().read_model(str(path)).get_ordered_ops()
    assert not [op for op in graph if op.get_type_name() == "Subtract"]  # on the weight path
    runtime_graph = openvino.Core().compile_model(str(path), "CPU").get_runtime_model()
    layers = [
        rt["runtimePrecision"].astype(str)
        for rt in (op.get_rt_info() for op in runtime_graph.get_ordered_ops())
        if rt["layerType"].astype(str) in ("Convolution", "FullyConnected")
    ]
    assert len(layers) == 5 and set(layers) <= {"u8", "i8"}, layers
    # and the numbers are torch's INT8 ones (OpenVINO runs the rest in bf16 on this CPU)
    images = fmnist.example_input(8)
    with torch.inference_mode():
        expected = int8(images)
    assert sqnr_db(expected, OpenVinoModel(path, 1)(images)) > 20


@pytest.mark.slow
def test_dynamic_int8_exports_in_onnxruntimes_dynamic_form(fmnist, tmp_path):
    torch.manual_seed(0)
    mlp = build_model(ModelConfig(name="compress.models:mlp", kwargs={"hidden": 64}), 10, 1)
    linears = sum(isinstance(m, torch.nn.Linear) for m in mlp.modules())
    int8 = quantize(mlp.eval(), fmnist, method="int8_dynamic", goal="size")
    path = export(int8, tmp_path / "m.onnx", "onnx", fmnist.example_input(2))
    exported = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert exported["MatMulInteger"] == exported["DynamicQuantizeLinear"] == linears
    assert exported["Gemm"] == 0  # no float matmul left beside the integer ones
    assert _ops_onnxruntime_runs(path, tmp_path)["DynamicQuantizeMatMul"] == linears
    images = fmnist.example_input(32)
    with torch.inference_mode():  # the same arithmetic as torch's dynamic INT8 graph
        expected = int8.reference_module(images)
    got = deployed(int8, "onnxruntime", 1, images, tmp_path / "m")(images)
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_the_runtimes_show_where_their_time_goes(trained_tiny, fmnist, tmp_path):
    """What scripts/runtime_layers.py reads: OpenVINO's per-node times and the graph ONNX
    Runtime runs after its optimisations."""
    xml = export(trained_tiny, tmp_path / "m.xml", "openvino", fmnist.example_input(2))
    profiled = OpenVinoModel(xml, 1, profile=True)
    profiled(fmnist.example_input(1))
    executed = [n for n in profiled.request.profiling_info if n.status.name == "EXECUTED"]
    assert sum(n.node_type == "Convolution" for n in executed) == 3  # tiny_cnn's three convs
    path = export(trained_tiny, tmp_path / "m.onnx", "onnx", fmnist.example_input(2))
    OnnxRuntimeModel(path, 1, optimized_to=tmp_path / "optimized.onnx")
    nodes = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    # As it runs on an x86 CPU: every Conv in ORT's blocked NCHWc layout, BN folded into it.
    assert {n.domain for n in nodes if n.op_type == "Conv"} == {"com.microsoft.nchwc"}
    assert not [n for n in nodes if n.op_type == "BatchNormalization"]


def _ops_onnxruntime_runs(path, folder) -> collections.Counter:
    """Op types of the graph ONNX Runtime executes after its own fusions."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    return collections.Counter(n.op_type for n in optimized.graph.node)


@pytest.mark.slow
def test_evaluator_headline_is_the_fastest_runtime_and_each_runtime_is_scored(
    trained_tiny, fmnist, tmp_path
):
    config = EvaluateConfig(warmup=2, iterations=20, runtimes=["torch", "onnxruntime", "openvino"])
    result = evaluate(trained_tiny, fmnist, config, name="m", deploy_to=tmp_path / "m")
    assert set(result.runtimes) == {"torch", "onnxruntime", "openvino"}
    fastest = min(result.runtimes, key=lambda r: result.runtimes[r]["latency_ms"].p50)
    assert result.runtime == fastest and result.latency_ms == result.runtimes[fastest]["latency_ms"]
    for name in ("onnxruntime", "openvino"):
        row = result.runtimes[name]
        assert abs(row["score"] - result.score) <= 0.5  # on 2,000 real images
        assert row["max_abs_diff"] < 0.5 and row["size_bytes"] > 0
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.xml").is_file()
    assert (tmp_path / "m.bin").is_file()  # the IR's weights beside it


def test_missing_deploy_extra_measures_in_torch_and_says_so(tiny, fmnist, monkeypatch, tmp_path):
    real = deploy.importlib.util.find_spec
    monkeypatch.setattr(
        deploy.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "openvino" else real(name, *a),
    )
    assert "openvino" not in deploy.available_runtimes()
    config = EvaluateConfig(warmup=1, iterations=3, runtimes=["torch", "openvino"], profile=False)
    result = evaluate(tiny, fmnist, config, name="m")
    assert set(result.runtimes) == {"torch"} and result.runtime == "torch"
    assert any("not measured in openvino" in n and "openvino missing" in n for n in result.notes)
    with pytest.raises(ExportError, match="compress\\[deploy\\]"):
        export(tiny, "unused.xml", "openvino", fmnist.example_input(2))
    # A run with the default runtimes goes on without it and says so once, not per step.
    recipe = parse_recipe(
        {
            "model": {"name": "tests.tiny:tiny_cnn"},
            "data": {"name": "synthetic", "synthetic_channels": 1, "synthetic_size": 32},
            "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}],
            "evaluate": {"accuracy": False, "warmup": 1, "iterations": 2, "profile": False},
        }
    )
    recipe.evaluate.runtimes = None
    monkeypatch.setattr(deploy, "RUNTIMES", ("torch", "openvino"))  # no compiles, no ORT
    report = compress_run(recipe, out=tmp_path / "run")
    assert [n for n in report.notes if "not installed" in n] == [
        "openvino not installed: measured in PyTorch only (pip install 'compress[deploy]'"
        " to measure where models are deployed)"
    ]
    assert all(set(e.runtimes) == {"torch"} for e in report.evaluations)


def test_unknown_runtime_is_a_recipe_error():
    with pytest.raises(RecipeError, match="evaluate.runtimes\\[0\\].*tensorrt.*onnxruntime"):
        parse_recipe({"evaluate": {"runtimes": ["tensorrt"]}})


@pytest.mark.slow
def test_export_command_writes_once_and_checks_the_file(trained_tiny, fmnist, tmp_path):
    folder = save(
        quantize(trained_tiny, fmnist, method="int8_static", goal="size", calibration_batches=1),
        tmp_path / "model",
        fmnist.example_input(2),
    )
    assert json.loads((folder / "manifest.json").read_text())["input_shape"] == [1, 28, 28]
    done = run_cli("export", str(folder), "--format", "openvino")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model.xml").is_file() and (tmp_path / "model.bin").is_file()
    assert "max |logit difference| from torch" in done.stdout
    again = run_cli("export", str(folder), "--format", "openvino")
    assert again.returncode == 2 and "never overwrites" in again.stderr
    missing = run_cli("export", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "not a compress model folder" in missing.stderr


@pytest.mark.slow  # a fresh interpreter
def test_a_float_model_exports_from_a_fresh_process(fmnist, tmp_path):
    """Exporting a float model must not need torchao's quantization ops registered: a
    process that loads a model folder and exports it has never imported torchao."""
    model = build_model(ModelConfig(name="compress.models:mlp", kwargs={"hidden": 64}), 10, 1)
    folder = save(model.eval(), tmp_path / "model", fmnist.example_input(2))
    done = run_cli("export", str(folder), "--format", "onnx", process=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model.onnx").is_file()


class _DataDependent(torch.nn.Module):
    """Control flow on a tensor's value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(784, 10)

    def forward(self, x):
        if x.sum() > 0:
            return self.linear(x.flatten(1))
        return -self.linear(x.flatten(1))


def test_unexportable_model_is_one_line(fmnist, tmp_path):
    with pytest.raises(ExportError) as error:
        export(_DataDependent(), tmp_path / "m.onnx", "onnx", fmnist.example_input(2))
    assert "_DataDependent does not export to ONNX" in str(error.value)
    assert "\n" not in str(error.value) and not (tmp_path / "m.onnx").exists()


def test_every_model_compiled_in_one_process_runs_compiled():
    # Dynamo runs a code object eagerly once 8 graphs sit on it, and a run compiles a new
    # model of one class per evaluation: each must still get a graph of its own.
    from torch._dynamo.utils import counters

    x = torch.randn(2, 8)
    for _ in range(10):
        model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
        compiled = InductorModel(model)
        graphs = counters["frames"]["ok"]
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), atol=1e-5)
        assert counters["frames"]["ok"] == graphs + 1  # compiled, not run eagerly
    copied = copy.deepcopy(compiled)  # a copy compiles its own weights, not the original's
    with torch.no_grad():
        copied.model[0].weight.add_(1.0)
        assert torch.allclose(copied(x), copied.model(x), atol=1e-5)
        assert not torch.allclose(copied(x), compiled(x))


@pytest.mark.parametrize("gemm", [False, True])
def test_weight_codes_go_in_along_the_axis_each_node_reads(gemm):
    # The exporter stores a Linear's weight as MatMul's K x N or as Gemm's N x K (transB):
    # the per-output-channel scales must run along the axis that node reads as outputs.
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from compress.measure.onnx_rewrite import WeightCodes, weight_code_matmuls

    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (8, 8)).astype(np.int8)
    scales = rng.uniform(0.005, 0.02, (8, 1)).astype(np.float32)  # one per output channel
    weight = (codes * scales).astype(np.float32)
    stored = weight if gemm else weight.T
    node = (
        helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
        if gemm
        else helper.make_node("MatMul", ["x", "w"], ["y"])
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(np.ascontiguousarray(stored), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    weights = [WeightCodes(8, codes, scales, None, 8, weight)]
    assert weight_code_matmuls(model, weights) == 1
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", node.op_type]
    x = rng.standard_normal((2, 8)).astype(np.float32)
    options = ort.SessionOptions()  # DequantizeLinear and MatMul as written: exact
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # quantizes, exports and compiles twice; NNCF's layout where it is installed
@pytest.mark.parametrize("group", [64, 128])  # neither OpenVINO's default (32)
def test_openvino_quantizes_a_4_bit_models_activations_in_the_weights_groups(
    group, fmnist, tmp_path
):
    # Groups as long as the weights' ran the GPT's INT4 prefill faster than OpenVINO's
    # default of 32 (scripts/bench_lm.py). The group is read from the IR.
    torch.manual_seed(0)
    mlp = build_model(ModelConfig(name="compress.models:mlp", kwargs={"hidden": 128}), 10, 1)
    int4 = quantize(mlp.eval(), fmnist, method="int4_weight_only", group_size=group)
    xml = export(int4, tmp_path / "int4.xml", "openvino", fmnist.example_input(2))
    runtime = OpenVinoModel(xml, 1)
    compiled = runtime.request.get_compiled_model()
    assert compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == group
    assert runtime.precision.endswith(f"(int4 weights, int8 activations per {group} inputs)")
    chosen = OpenVinoModel(xml, 1, activation_group=16).request.get_compiled_model()
    assert chosen.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 16  # bench_lm's contrast
    images = fmnist.example_input(16)  # 784 inputs: no whole number of groups, yet the same
    with torch.inference_mode():
        assert sqnr_db(int4(images), runtime(images)) > 25
    float_xml = export(mlp, tmp_path / "float.xml", "openvino", fmnist.example_input(2))
    assert "per" not in OpenVinoModel(float_xml, 1).precision  # no 4-bit codes: as it was
    nncf = pytest.importorskip("nncf")  # its layout: [out, in/group, group], not ours
    import openvino

    graph = openvino.Core().read_model(str(float_xml))
    compressed = nncf.compress_weights(  # the 784-input layer left in NNCF's INT8
        graph,
        mode=nncf.CompressWeightsMode.INT4_ASYM,
        group_size=group,
        ratio=1.0,
        all_layers=True,
        advanced_parameters=nncf.AdvancedCompressionParameters(
            group_size_fallback_mode=nncf.GroupSizeFallbackMode.IGNORE
        ),
    )
    openvino.save_model(compressed, str(tmp_path / "nncf.xml"))
    compiled = OpenVinoModel(tmp_path / "nncf.xml", 1).request.get_compiled_model()
    assert compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == group
