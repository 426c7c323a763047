"""Data-parallel scaling of compress's training loop on this machine: images/s of the same
ResNet-18 fine-tune (Fashion-MNIST, the same global batch and steps) in one process, in 2
processes (torchrun), and in 2 "nodes" of one process each, joined over the loopback by
torchrun's c10d rendezvous (each pinned to its own core, as two machines would be). Prints
one JSON line per configuration with images/s and the efficiency against one process.

    python scripts/bench_ddp.py [--steps 30] [--batch 128] [--variants]

``--variants`` adds DDP settings measured to choose the defaults in compress/train.py
(gradient buckets, bf16 gradient exchange, static graph, gradient accumulation).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

WARMUP_STEPS = 3
DEFAULT_DDP = {"gradient_as_bucket_view": True, "broadcast_buffers": False}  # train.DDP_OPTIONS
TARGET = 0.9  # 2 processes x 1 thread >= 0.9x one process x 2 threads (issue 17)


def worker(args) -> None:
    import importlib

    import torch

    from compress import distributed
    from compress.data import build_data
    from compress.models import build_model
    from compress.recipe import DataConfig, TrainConfig

    loop = importlib.import_module("compress.train")  # the module; compress.train is the function
    options = json.loads(args.ddp)
    loop.DDP_BF16_GRADIENTS = options.pop("bf16", False)
    loop.DDP_OPTIONS = options
    distributed.init_from_env("cpu")
    world = distributed.world_size()
    per_rank = args.batch // world // args.accumulate
    data = build_data(
        DataConfig(train_subset=args.batch * (args.steps + WARMUP_STEPS), batch_size=per_rank),
        seed=0,
    )
    model = build_model("resnet18", data=data)

    def fine_tune(steps):
        config = TrainConfig(
            epochs=0,
            max_steps=steps,
            lr=0.01,
            schedule="constant",
            validate=False,
            accumulate=args.accumulate,
            threads=args.threads or None,
        )
        return loop.train(model, data, config, seed=0, desc="bench")

    fine_tune(WARMUP_STEPS)
    distributed.barrier()
    started = time.perf_counter()
    fine_tune(args.steps)
    distributed.barrier()
    seconds = time.perf_counter() - started
    if distributed.is_main():
        print(
            json.dumps(
                {
                    "images_per_s": args.steps * args.batch / seconds,
                    "threads_per_process": torch.get_num_threads(),
                    "processes": world,
                }
            )
        )
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, args, processes: int = 1, nodes: int = 1, **worker_options) -> dict:
    command = [
        "--worker",
        f"--steps={args.steps}",
        f"--batch={args.batch}",
        f"--accumulate={worker_options.get('accumulate', 1)}",
        f"--threads={worker_options.get('threads', 0)}",
        f"--ddp={json.dumps(worker_options.get('ddp', DEFAULT_DDP))}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if processes == 1 and nodes == 1:
        runs = [
            subprocess.Popen(
                [sys.executable, __file__, *command], stdout=subprocess.PIPE, text=True, env=env
            )
        ]
    else:
        port = free_port()
        runs = []
        for node in range(nodes):
            torchrun = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={nodes}",
                f"--nproc-per-node={processes}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=bench-ddp",
            ]
            # A "node" of its own is a machine of its own: it gets its share of the cores.
            cores = sorted(os.sched_getaffinity(0))
            share = set(cores[node::nodes]) if nodes > 1 else set(cores)
            runs.append(
                subprocess.Popen(
                    [*torchrun, __file__, *command],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    env=env,
                    preexec_fn=lambda share=share: os.sched_setaffinity(0, share),
                )
            )
    outputs = [run.communicate()[0] for run in runs]
    if any(run.returncode for run in runs):
        raise SystemExit(f"{name}: a process failed")
    line = next(line for out in outputs for line in out.splitlines() if line.startswith("{"))
    return {"config": name, **json.loads(line)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128, help="global batch per step")
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--accumulate", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--ddp", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    configs = [
        ("1 process", {}),
        ("2 processes", {"processes": 2}),
        ("2 nodes x 1 process (loopback)", {"nodes": 2}),
    ]
    if args.variants:
        with_default = {"processes": 2}
        configs += [
            ("2 processes, DDP's own defaults", {**with_default, "ddp": {}}),
            (
                "2 processes, buffers broadcast",
                {**with_default, "ddp": {**DEFAULT_DDP, "broadcast_buffers": True}},
            ),
            ("2 processes, bf16 gradients", {**with_default, "ddp": {**DEFAULT_DDP, "bf16": True}}),
            (
                "2 processes, static graph",
                {**with_default, "ddp": {**DEFAULT_DDP, "static_graph": True}},
            ),
            (
                "2 processes, 100 MB buckets",
                {**with_default, "ddp": {**DEFAULT_DDP, "bucket_cap_mb": 100}},
            ),
            ("2 processes, accumulate 2", {**with_default, "accumulate": 2}),
            ("2 processes x 2 threads (each all cores)", {**with_default, "threads": 2}),
        ]
    results: dict[str, list[float]] = {name: [] for name, _ in configs}
    extra: dict[str, dict] = {}
    for _ in range(args.rounds):  # alternating, so that drifts of a shared machine hit all
        for name, options in configs:
            row = launch(name, args, **options)
            results[name].append(row["images_per_s"])
            extra[name] = row
    single = sorted(results["1 process"])[len(results["1 process"]) // 2]
    for name, _ in configs:
        rates = sorted(results[name])
        median = rates[len(rates) // 2]
        print(
            json.dumps(
                {
                    "config": name,
                    "images_per_s": round(median, 1),
                    "runs": [round(r, 1) for r in results[name]],
                    "vs_one_process": round(median / single, 3),
                    "processes": extra[name]["processes"],
                    "threads_per_process": extra[name]["threads_per_process"],
                    "global_batch": args.batch,
                    "steps": args.steps,
                    "target": TARGET if name == "2 processes" else None,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
