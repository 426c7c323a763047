"""The one training loop (train): fine-tunes, distillation, QAT, baselines and controls."""
