"""The quantize stage's options (``stages: - quantize: {...}``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from compress.core.schema import Config, option
from compress.spec.recipe import TrainConfig

# How a quantization-aware fine-tune trains by default: short, gentle, from the trained model.
QAT_TRAINING: dict[str, Any] = {"epochs": 1, "lr": 1e-3, "schedule": "cosine", "weight_decay": 0.0}
STATIC = ("int8_static",)
SMOOTHABLE = ("int8_static", "int8_dynamic")  # activations quantized: outliers matter
# Methods whose accuracy can be traded back layer by layer (they honour `skip`, cheaply).
FALLBACK_METHODS = ("int8_static", "int8_dynamic", "int4_weight_only", "int8_weight_only")
INT8_METHODS = ("int8_static", "int8_dynamic", "int8_qat")


@dataclass
class QuantizeConfig(Config):
    """`stages: - quantize: {...}`. Each option says which methods read it; setting one the
    method does not read is an error rather than a silent no-op."""

    # int8_static: calibrated INT8 (torchao PT2E, x86 kernels); int8_dynamic: INT8 Linear
    # weights, activations quantized at run time; int8_qat: quantization-aware fine-tune;
    # fp16 / bf16: cast; int4_weight_only / int8_weight_only: 4-bit group-wise or 8-bit
    # per-channel Linear weights, float activations (torch's CPU weight-only kernels).
    method: Literal[
        "int8_static",
        "int8_dynamic",
        "int8_qat",
        "fp16",
        "bf16",
        "int4_weight_only",
        "int8_weight_only",
    ] = "int8_static"
    # Batches of data.eval_batch_size that static INT8's observers and SmoothQuant read.
    calibration_batches: int = option(16, min=1, methods=SMOOTHABLE)
    # Activation range estimator: histogram (torchao's x86 default, minimises the L2 error),
    # minmax, moving_average (of per-batch min/max), percentile (clips outliers).
    observer: Literal["minmax", "moving_average", "histogram", "percentile"] = option(
        "histogram", methods=STATIC
    )
    # With observer: percentile, the range runs from the (100-p)-th to the p-th percentile.
    percentile: float = option(99.99, min=90.0, max=100.0, methods=STATIC)
    # One weight scale per output channel; false gives all channels one scale (per-tensor
    # numbers, still the fast per-channel kernels).
    per_channel: bool = option(True, methods=STATIC)
    # SmoothQuant's migration strength α (0-1): each input channel of a Linear behind a norm
    # is divided by max|X|^α / max|W|^(1-α), folded into the norm, before INT8 (for
    # transformers whose activations have outlier channels); null: off.
    smoothquant: float | None = option(None, min=0.0, max=1.0, methods=SMOOTHABLE)
    # Shift each INT8 layer's bias by the mean error its rounded weights add to its output
    # (their error times the layer's mean input on the calibration split), as NNCF's
    # post-training flow does by default; false: the rounded weights' biases unchanged.
    bias_correction: bool = option(True, methods=STATIC)
    # Activations' zero point fixed mid-range (else fitted to the range).
    symmetric: bool = option(False, methods=STATIC)
    # Layers kept in float: dotted module names, or "re:<regex>" patterns ("re:layer4\..*").
    skip: list[str] = option(default_factory=list, methods=(*FALLBACK_METHODS, "int8_qat"))
    # Points of the task's metric the stage may lose (on the calibration split); beyond it the
    # most sensitive layers go back to float one by one. Default: evaluate.max_accuracy_drop.
    max_accuracy_drop: float | None = option(None, min=0.0, methods=FALLBACK_METHODS)
    # Input weights sharing one scale and zero point.
    group_size: int = option(128, min=8, max=65536, methods=("int4_weight_only",))
    # speed: keep the input model where INT8 is not faster than it, both timed side by side
    # in their fastest runtimes of evaluate.runtimes (the report says which and by how much);
    # size: INT8 even where it is slower, for its size alone.
    goal: Literal["speed", "size"] = option("speed", methods=INT8_METHODS)
    # With goal: speed, where the whole INT8 model is not faster: its blocks (top-level
    # children; MobileNet's `features.N`) go back to float one at a time, each kept float
    # where the model is then faster in INT8's runtime (paired rounds). One export and
    # timing per block (a minute or more per model), so it is asked for, not default.
    speed_by_block: bool = option(False, methods=("int8_static", "int8_dynamic"))
    # The shared training loop's settings for the quantization-aware fine-tune.
    fine_tune: TrainConfig = option(
        default_factory=lambda: TrainConfig(**QAT_TRAINING),
        defaults=QAT_TRAINING,
        methods=("int8_qat",),
    )

    def resolve(self, recipe) -> None:
        """The run's accuracy target is this stage's unless it sets its own."""
        if self.max_accuracy_drop is None and self.method in FALLBACK_METHODS:
            self.max_accuracy_drop = recipe.evaluate.max_accuracy_drop
