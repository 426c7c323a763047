"""Peak memory of one stage on one model, under the guard every stage of a run has.

Runs the stage (structured pruning to 0.5x MACs by default) on a torchvision model with
random weights and synthetic images in a child process whose memory guard
(compress/core/memory.py) is given ``--cap-gib`` over what the process held before the stage;
the parent reads the child's peak resident memory (VmHWM) when it ends. Prints one JSON
line per model: whether the stage finished or the guard stopped it, the peak, the time, the
MACs ratio reached, and the stage's first note or the guard's one line. The cap keeps the
figure safe to take on a shared machine.

    python scripts/bench_memory.py [--models swin_t resnet18] [--image-size 224] [--cap-gib 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = """
import sys
from compress.data import build_data
from compress.core.memory import memory_guard, resident_bytes
from compress.models.build import build_model
from compress.stages.prune import prune
from compress.spec.recipe import DataConfig

name, size, cap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
data = build_data(
    DataConfig(name="synthetic", image_size=size, synthetic_size=8, calibration_size=8,
               eval_batch_size=8),
    seed=0,
)
model = build_model(name, data=data)
with memory_guard(f"prune (structured) of {name}", resident_bytes() + int(cap * 2**30)):
    pruned = prune(model, data, method="structured", target_macs=0.5)
print("pruned", pruned.stage_details["macs_ratio"], *pruned.notes, sep=chr(10))
"""


def peak_of(process: subprocess.Popen) -> tuple[float, str, str]:
    """The child's peak resident GiB (read from /proc while it runs), stdout, stderr."""
    peak = 0
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.05)
    out, err = process.communicate()
    return peak / 2**30, out, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["swin_t", "resnet18"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cap-gib", type=float, default=8.0, help="the guard's limit")
    args = parser.parse_args()
    for name in args.models:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, name, str(args.image_size), str(args.cap_gib)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        peak, out, err = peak_of(child)
        guard = [line for line in err.splitlines() if "out of memory" in line]
        lines = out.splitlines()
        pruned = lines[lines.index("pruned") + 1 :] if "pruned" in lines else []
        row = {
            "model": name,
            "stage": "prune structured, target_macs 0.5",
            "image_size": args.image_size,
            "cap_gib": args.cap_gib,
            "outcome": "pruned" if pruned else "stopped by the guard" if guard else "failed",
            "macs_ratio": round(float(pruned[0]), 3) if pruned else None,
            "peak_gib": round(peak, 2),
            "seconds": round(time.perf_counter() - started, 1),
            # The stage's notes where it pruned (what it left), else the guard's or last line.
            "message": (pruned[1:] or guard or err.strip().splitlines()[-1:] or [""])[0][:300],
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
