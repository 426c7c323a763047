"""Hugging Face causal LMs in and out (issue 36): a GPT-2 folder compress did not write (made
here with transformers from a config) goes through `compress run` and its compressed float
model loads back in transformers with the same outputs; INT8 dynamic reaches GPT-2's Conv1D
layers; a Llama built from a recipe's config loses whole heads and saves back with a config
that says so; structured pruning of GPT-2's fused attention is one line; hostile folders
(remote code, oversized shapes, a pickle, a lying header) are one-line errors, read as data.
"""

import json
import struct

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from compress.core.errors import ArtifactError, RecipeError  # noqa: E402
from compress.measure.decode import decoding_step, empty_cache, has_decoder  # noqa: E402
from compress.measure.scores import example_scores  # noqa: E402
from compress.models.artifact import load, save  # noqa: E402
from compress.models.build import build_model  # noqa: E402
from compress.models.hugging_face import ARCHITECTURES, FACTORY, CausalLM  # noqa: E402
from compress.spec.tasks import get_task  # noqa: E402
from compress.stages.prune import prune  # noqa: E402
from compress.stages.quantize import PerTokenInt8Model, quantize  # noqa: E402
from tests.conftest import TINY_TEXT, run_cli  # noqa: E402

LM = get_task("language_model")
TINY_GPT2 = {"n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 48,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A GPT-2 in the save_pretrained layout, written by transformers, not by compress."""
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=84, bos_token_id=0, eos_token_id=0, **TINY_GPT2)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


def _ids(count: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 84, (count, length), generator=torch.Generator().manual_seed(0))


def _hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_gpt2_folder_reads_as_the_model_transformers_reads(gpt2_folder):
    model = build_model({"name": FACTORY, "checkpoint": str(gpt2_folder)}, num_classes=84)
    assert isinstance(model, CausalLM) and "transformer.h.0.attn.c_attn" in model.conv1d_layers
    assert isinstance(model.lm.transformer.h[0].attn.c_attn, torch.nn.Linear)  # INT8 reaches it
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _hf_logits(gpt2_folder, ids))


def test_a_gpt2_folder_through_compress_run_loads_back_in_transformers(gpt2_folder, tmp_path):
    recipe = tmp_path / "gpt2.yaml"
    recipe.write_text(
        f"name: gpt2_sparse\nmodel: {{name: {FACTORY!r}, checkpoint: {str(gpt2_folder)!r}}}\n"
        f"data: {json.dumps(TINY_TEXT)}\n"
        "stages: [{prune: {method: magnitude, sparsity: 0.5}}]\n"
        "evaluate: {runtimes: [torch], warmup: 1, iterations: 3, latency_rounds: 3}\n"
    )
    result = run_cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    compressed = load(tmp_path / "run" / "model")
    ids = _ids()
    with torch.no_grad():
        ours = compressed(ids)
    theirs = _hf_logits(tmp_path / "run" / "model" / "hugging_face", ids)
    torch.testing.assert_close(theirs, ours)
    original = _hf_logits(gpt2_folder, ids)
    assert not torch.allclose(theirs, original)  # the sparse weights, not the folder's own
    weight = compressed.lm.transformer.h[0].mlp.c_fc.weight
    assert (weight == 0).float().mean() >= 0.45


@pytest.mark.slow
def test_int8_dynamic_reaches_gpt2s_conv1d_layers_and_saves_exactly(
    gpt2_folder, tiny_text, tmp_path
):
    model = build_model({"name": FACTORY, "checkpoint": str(gpt2_folder)}, data=tiny_text)
    quantized = quantize(model, tiny_text, method="int8_dynamic", goal="size")
    assert isinstance(quantized, PerTokenInt8Model)
    assert {"lm.transformer.h.0.attn.c_attn", "lm.transformer.h.1.mlp.c_proj"} <= set(
        quantized.layers
    )
    float_loss = LM.summarize(example_scores(model, tiny_text))["loss"]
    int8_loss = LM.summarize(example_scores(quantized, tiny_text))["loss"]
    assert abs(int8_loss - float_loss) < 0.05
    save(quantized, tmp_path / "int8", tiny_text.example_input(2))
    assert not (tmp_path / "int8" / "hugging_face").exists()  # INT8: compress's folder only
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "int8")(ids), quantized(ids))


def test_structured_pruning_of_gpt2s_fused_attention_is_one_line(gpt2_folder, tiny_text):
    model = build_model({"name": FACTORY, "checkpoint": str(gpt2_folder)}, data=tiny_text)
    with pytest.raises(
        RecipeError, match=r"prune.method: 'structured'.*Conv1D.*allowed: 'magnitude'"
    ):
        prune(model, tiny_text, method="structured", ratio=0.3)


def test_a_llama_from_a_recipe_loses_whole_heads_and_saves_back(tiny_text, tmp_path):
    torch.manual_seed(0)
    model = build_model({"name": FACTORY, "kwargs": {"config": TINY_LLAMA}}, data=tiny_text)
    assert model.lm.config.vocab_size == tiny_text.num_classes  # from the data
    pruned = prune(model, tiny_text, method="structured", ratio=0.34, fine_tune={"epochs": 0})
    for layer in pruned.lm.model.layers:
        attention = layer.self_attn
        widths = {attention.q_proj.out_features, attention.k_proj.out_features}
        assert widths == {attention.v_proj.out_features} and widths != {48}
        assert attention.q_proj.out_features % attention.head_dim == 0  # whole heads
        assert attention.o_proj.in_features == attention.q_proj.out_features
    save(pruned, tmp_path / "pruned", tiny_text.example_input(2))
    folder = tmp_path / "pruned" / "hugging_face"
    config = json.loads((folder / "config.json").read_text())
    heads = pruned.lm.model.layers[0].self_attn.q_proj.out_features // 8
    assert config["num_attention_heads"] == heads < 6
    ids = _ids(length=16)
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(folder, ids), pruned(ids))
        torch.testing.assert_close(load(tmp_path / "pruned")(ids), pruned(ids))


# ---------------------------------------------------------------------- hostile folders


def _folder(tmp_path, config: dict, tensors: dict | None = None, header: bytes | None = None):
    """A save_pretrained-style folder written by hand: config.json, and a safetensors file
    of ``tensors`` (or a raw ``header``)."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tensors is not None or header is not None:
        if header is None:
            entries, offset, blob = {}, 0, b""
            for name, tensor in tensors.items():
                raw = tensor.contiguous().numpy().tobytes()
                entries[name] = {
                    "dtype": "F32",
                    "shape": list(tensor.shape),
                    "data_offsets": [offset, offset + len(raw)],
                }
                offset, blob = offset + len(raw), blob + raw
            header = json.dumps(entries).encode()
            data = struct.pack("<Q", len(header)) + header + blob
        else:
            data = header
        (tmp_path / "model.safetensors").write_bytes(data)
    return tmp_path


GPT2_CONFIG = {"model_type": "gpt2", "vocab_size": 84, **TINY_GPT2}


@pytest.mark.parametrize(
    "case, config, match",
    [
        ("remote code", {**GPT2_CONFIG, "auto_map": {"AutoModel": "evil.Model"}}, "remote code"),
        (
            "unknown type",
            {**GPT2_CONFIG, "model_type": "evil"},
            "model_type: 'evil'.*allowed: llama",
        ),
        ("oversized", {**GPT2_CONFIG, "n_embd": 1 << 20, "n_head": 1}, "GiB.*cap; refused"),
        (
            "quantized",
            {**GPT2_CONFIG, "quantization_config": {"quant_method": "gptq"}},
            "quantization_config",
        ),
    ],
)
def test_hostile_configs_are_one_line_errors(tmp_path, case, config, match):
    folder = _folder(tmp_path / "m", config, {})
    with pytest.raises(ArtifactError, match=match):
        build_model({"name": FACTORY, "checkpoint": str(folder)}, num_classes=84)


def test_a_pickle_in_place_of_safetensors_is_refused_unread(tmp_path):
    folder = _folder(tmp_path / "m", GPT2_CONFIG)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not read")
    with pytest.raises(ArtifactError, match=r"pytorch_model.bin: a pickle.*never loads"):
        build_model({"name": FACTORY, "checkpoint": str(folder)}, num_classes=84)


def test_safetensors_that_do_not_fit_the_config_are_refused(tmp_path):
    wrong = {"transformer.wte.weight": torch.zeros(84, 64)}  # the config says 32 wide
    folder = _folder(tmp_path / "shape", GPT2_CONFIG, wrong)
    with pytest.raises(ArtifactError, match=r"wte.weight has shape \[84, 64\].*\[84, 32\]"):
        build_model({"name": FACTORY, "checkpoint": str(folder)}, num_classes=84)
    foreign = _folder(tmp_path / "name", GPT2_CONFIG, {"evil": torch.zeros(1)})
    with pytest.raises(ArtifactError, match="'evil' is not a weight"):
        build_model({"name": FACTORY, "checkpoint": str(foreign)}, num_classes=84)
    huge = _folder(tmp_path / "header", GPT2_CONFIG, header=struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ArtifactError, match="header; refused"):
        build_model({"name": FACTORY, "checkpoint": str(huge)}, num_classes=84)
    lying = {"transformer.wte.weight": torch.zeros(84, 32)}
    folder = _folder(tmp_path / "short", GPT2_CONFIG, lying)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])  # offsets past the end
    with pytest.raises(ArtifactError, match="overruns"):
        build_model({"name": FACTORY, "checkpoint": str(folder)}, num_classes=84)
    partial = _folder(tmp_path / "partial", GPT2_CONFIG, lying)
    with pytest.raises(ArtifactError, match="hold no"):
        build_model({"name": FACTORY, "checkpoint": str(partial)}, num_classes=84)


def test_a_hostile_folder_in_a_recipe_exits_2_in_one_line(tmp_path):
    folder = _folder(tmp_path / "m", {**GPT2_CONFIG, "auto_map": {"AutoModel": "x.Y"}}, {})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: r\nmodel: {{name: {FACTORY!r}, checkpoint: {str(folder)!r}}}\n"
        f"data: {json.dumps(TINY_TEXT)}\n"
    )
    result = run_cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "remote code" in lines[-1] and "Traceback" not in result.stderr
    assert len([line for line in lines if "remote code" in line]) == 1


def test_structured_pruning_of_grouped_query_attention_is_one_line(tiny_text):
    grouped = {**TINY_LLAMA, "num_key_value_heads": 2}
    model = build_model({"name": FACTORY, "kwargs": {"config": grouped}}, data=tiny_text)
    with pytest.raises(RecipeError, match="grouped-query attention"):
        prune(model, tiny_text, method="structured", ratio=0.3)
    # Its layers are numbered in its config: no whole layer is removed either.
    llama = build_model({"name": FACTORY, "kwargs": {"config": TINY_LLAMA}}, data=tiny_text)
    with pytest.raises(RecipeError, match=r"prune.layers: 1: .*numbers its layers in its config"):
        prune(llama, tiny_text, method="structured", layers=1, ratio=0.0)


def test_a_hugging_face_folder_under_another_model_name_is_one_line(gpt2_folder):
    with pytest.raises(
        RecipeError, match=r"model.name: 'resnet18'.*allowed: 'compress.models:hugging_face'"
    ):
        build_model({"name": "resnet18", "checkpoint": str(gpt2_folder)}, num_classes=84)


def _decoded(step, model, ids: torch.Tensor):
    cache = empty_cache(model)
    logits = []
    for position in range(ids.shape[1]):
        out, cache = step(ids[:, position : position + 1].numpy(), np.array([position]), cache)
        logits.append(out[:, 0])
    return torch.from_numpy(np.stack(logits, 1))


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_decodes_with_a_cache_in_each_runtime(model_type, tiny_text, tmp_path):
    config = TINY_LLAMA if model_type != "gpt2" else GPT2_CONFIG
    torch.manual_seed(0)
    model = build_model(
        {"name": FACTORY, "kwargs": {"config": {**config, "model_type": model_type}}},
        data=tiny_text,
    )
    if model_type == "llama":  # pruned heads: the cache follows the layers, not the config
        model = prune(model, tiny_text, method="structured", ratio=0.34, fine_tune={"epochs": 0})
    assert has_decoder(model) and empty_cache(model).shape[4] == 64  # the config's positions
    ids = _ids(count=1, length=12)
    with torch.no_grad():
        expected = model(ids)
    for runtime, tolerance in (("torch", 1e-4), ("onnxruntime", 1e-4), ("openvino", 0.05)):
        step = decoding_step(model, runtime, threads=1, folder=tmp_path / runtime)
        got = _decoded(step, model, ids)
        assert (got - expected).abs().max() < tolerance, runtime
