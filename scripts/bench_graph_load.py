"""The work a stored graph can cause: loading a model folder whose graph is a small network
plus N chained operations, for several N. Each load runs in its own process; prints one
JSON line per N with the file's size, whether it loaded or was refused (and why), the
seconds it took and the process's peak resident memory.

    python scripts/bench_graph_load.py [--lengths 3000 30000 90000 300000]
    python scripts/bench_graph_load.py --zoo resnet18 swin_t maxvit_t [--image-size 224]

``--zoo`` instead counts what real networks hold, the ground of the ceiling
(compress/models/artifact/graph.py): each torchvision classifier exported as compress stores it, its
graph's nodes and tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/hostile.py's chain

from compress.models.artifact import save  # noqa: E402
from tests.hostile import chain, edit_graph  # noqa: E402

CHILD = """
import json, resource, sys, time
from pathlib import Path
from compress.models.artifact import ArtifactError, load
started = time.perf_counter()
try:
    nodes = len(load(Path(sys.argv[1])).graph.nodes)
    outcome = f"loaded {nodes} nodes"
except ArtifactError as error:
    outcome = f"refused: {str(error).split(': ', 1)[1]}"
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"outcome": outcome, "seconds": round(seconds, 2), "peak_gib": round(peak, 2)}))
"""


def zoo(names: list[str], image_size: int) -> None:
    from compress.models.build import build_model

    for name in names:
        model = build_model(name, num_classes=10, in_channels=3).eval()
        del model.compress_spec  # stored as a graph, as a model compress did not build is
        with tempfile.TemporaryDirectory() as root:
            folder = save(
                model, Path(root) / name, example=torch.randn(2, 3, image_size, image_size)
            )
            graph = json.loads((folder / "graph.json").read_text())
        tensors = sum(node["op"] == "get_attr" for node in graph["nodes"])
        nodes = len(graph["nodes"])
        row = {"model": name, "image_size": image_size, "nodes": nodes, "tensors": tensors}
        print(json.dumps({**row, "nodes_per_tensor": round(nodes / tensors, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[3000, 30000, 90000, 300000])
    parser.add_argument("--zoo", nargs="+", help="torchvision classifiers to count")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    if args.zoo:
        zoo(args.zoo, args.image_size)
        return
    # 1,602 tensors: the ceiling is then the absolute one (100,000 nodes), not 64 a tensor.
    nn = torch.nn
    layers = [nn.Linear(4, 4) for _ in range(799)]
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 4), *layers, nn.Linear(4, 10)).eval()
    with tempfile.TemporaryDirectory() as root:
        for length in args.lengths:
            folder = save(model, Path(root) / str(length), example=torch.randn(2, 1, 28, 28))
            edit_graph(folder, chain(length))
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True
            )
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            row = {"chained": length, "megabytes": (folder / "graph.json").stat().st_size / 1e6}
            print(json.dumps({**row, **json.loads(done.stdout.splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
