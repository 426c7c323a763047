"""What a model costs and scores: the shared evaluator (evaluate), per-layer costs and
peaks (profile), and the runtimes it ships to (deploy: ONNX Runtime, OpenVINO)."""
