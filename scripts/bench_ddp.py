"""Data-parallel scaling of compress's training loop on this machine: images/s of the same
ResNet-18 fine-tune (Fashion-MNIST, the same global batch and steps) in one process, in 2
processes (torchrun), and in 2 "nodes" of one process each, joined over the loopback by
torchrun's c10d rendezvous (each pinned to its own core, as two machines would be). Prints
one JSON line per configuration with images/s and the efficiency against one process.

    python scripts/bench_ddp.py [--steps 30] [--batch 128] [--variants] [--ceilings]
    python scripts/bench_ddp.py --recipe RECIPE [--set key=value ...] [--out DIR]

``--variants`` adds DDP settings measured to choose the defaults in compress/training/train.py
(gradient buckets, bf16 gradient exchange, static graph, gradient accumulation).
``--ceilings`` adds what bounds 2 processes on one machine: two independent single-thread
processes with no exchange at all, and the time of one all-reduce of the model's gradients;
and 2 processes with ``train.sync_batchnorm``.
``--recipe`` runs a whole recipe in one process and under torchrun with 2 processes (each
with half the batch: the same global batch and steps), without and with
``train.sync_batchnorm``, and pairs each run's last model image by image with the single
run's (exact McNemar interval): one JSON line per run. ``--noise`` adds the single run
with 3 other seeds and with one thread (only the order of float sums differs), to show how
far training moves from itself. Given an ``--out`` of an earlier call, finished runs are
read, not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WARMUP_STEPS = 3
DEFAULT_DDP = {"gradient_as_bucket_view": True, "broadcast_buffers": False}  # train.DDP_OPTIONS
TARGET = 0.9  # 2 processes x 1 thread >= 0.9x one process x 2 threads (issue 17)


def worker(args) -> None:
    import importlib

    import torch

    from compress.core import distributed
    from compress.data import build_data
    from compress.models.build import build_model
    from compress.spec.recipe import DataConfig, TrainConfig

    loop = importlib.import_module(
        "compress.training.train"
    )  # the module; compress.train is the function
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
            sync_batchnorm=args.sync_batchnorm,
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


def allreduce_worker(args) -> None:
    """Under torchrun: the median time of one gloo all-reduce of ResNet-18's gradients."""
    import torch
    import torch.distributed as dist

    from compress.core import distributed
    from compress.models.build import build_model

    distributed.init_from_env("cpu")
    torch.set_num_threads(1)
    elements = sum(p.numel() for p in build_model("resnet18", 10, 1).parameters())
    gradients = torch.randn(elements)
    times = []
    for _ in range(WARMUP_STEPS + args.steps):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(gradients)
        times.append(time.perf_counter() - started)
    if distributed.is_main():
        times = sorted(times[WARMUP_STEPS:])
        megabytes = gradients.numel() * gradients.element_size() / 1e6
        print(json.dumps({"allreduce_ms": 1000 * times[len(times) // 2], "megabytes": megabytes}))
    distributed.shutdown()


def torchrun(processes: int, port: int, nodes: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc-per-node={processes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=bench-ddp",
    ]


def independent(name: str, args) -> dict:
    """Two single-process trainings side by side, each on half the global batch and one
    thread, with no exchange at all: the most 2 processes can make of this machine."""
    command = [__file__, "--worker", f"--steps={args.steps}", f"--batch={args.batch // 2}"]
    command += ["--threads=1", f"--ddp={json.dumps(DEFAULT_DDP)}"]
    runs = [
        subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate()[0] for run in runs]
    if any(run.returncode for run in runs):
        raise SystemExit(f"{name}: a process failed")
    rates = [json.loads(out.strip().splitlines()[-1])["images_per_s"] for out in outputs]
    return {"config": name, "images_per_s": sum(rates), "threads_per_process": 1, "processes": 2}


def allreduce(args) -> dict:
    run = subprocess.run(
        [*torchrun(2, free_port()), __file__, "--allreduce-worker", f"--steps={args.steps}"],
        capture_output=True,
        text=True,
    )
    if run.returncode:
        raise SystemExit(f"all-reduce: a process failed: {run.stderr[-500:]}")
    line = next(line for line in run.stdout.splitlines() if line.startswith("{"))
    name = "one all-reduce of ResNet-18's gradients, 2 processes, gloo"
    return {"config": name, **json.loads(line)}


def recipe_runs(args) -> None:
    """The recipe in 1 process and in 2 (half the batch each), without and with synced
    BatchNorm; each run's last model paired with the single run's, image by image."""
    from compress.core.stats import paired_drop
    from compress.measure.evaluation import Evaluation
    from compress.spec.recipe import TrainConfig, load_recipe

    recipe = load_recipe(args.recipe, args.set)
    half = f"data.batch_size={recipe.data.batch_size // 2}"
    runs = [
        ("1 process", [sys.executable, "-m", "compress"], []),
        ("2 processes, half the batch each", [*torchrun(2, free_port()), "-m", "compress"], [half]),
        (
            "2 processes, half the batch each, sync_batchnorm",
            [*torchrun(2, free_port()), "-m", "compress"],
            [half, "train.sync_batchnorm=true"],
        ),
    ]
    if args.noise:  # how far one process moves from itself: another seed, another thread count
        stage_threads = [  # each stage's own trainings too (they have their own settings)
            f"stages.{index}.{stage.kind}.{key}.threads=1"
            for index, stage in enumerate(recipe.stages)
            for key, value in vars(stage.config).items()
            if isinstance(value, TrainConfig)
        ]
        single_run = [sys.executable, "-m", "compress"]
        runs += [
            *(
                (f"1 process, seed {recipe.seed + k}", single_run, [f"seed={recipe.seed + k}"])
                for k in (1, 2, 3)
            ),
            ("1 process, 1 thread", single_run, ["train.threads=1", *stage_threads]),
        ]
    single = None
    for name, launcher, extra in runs:
        out = Path(args.out) / name.replace(" ", "_").replace(",", "")
        sets = [word for value in [*args.set, *extra] for word in ("--set", value)]
        started = time.perf_counter()
        if not (out / "report.json").is_file():  # a finished run of an earlier call is read
            subprocess.run([*launcher, "run", args.recipe, "--out", str(out), *sets], check=True)
        wall = time.perf_counter() - started
        report = json.loads((out / "report.json").read_text())
        last = report["evaluations"][-1]
        correct = Evaluation.from_dict(last).example_rows()[:, 0].astype(bool)  # top-1 hits
        row = {"config": name, "wall_s": round(wall) or None, "step": last["name"]}
        row |= {"top1": last["score"], "recipe": args.recipe, "sets": [*args.set, *extra]}
        if single is None:
            single = correct
        else:
            drop = paired_drop(single, correct)
            row["vs_1_process"] = {
                k: getattr(drop, k) for k in ("points", "interval", "lost", "gained")
            }
        print(json.dumps(row), flush=True)


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
        *(["--sync-batchnorm"] if worker_options.get("sync_batchnorm") else []),
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
            # A "node" of its own is a machine of its own: it gets its share of the cores.
            cores = sorted(os.sched_getaffinity(0))
            share = set(cores[node::nodes]) if nodes > 1 else set(cores)
            runs.append(
                subprocess.Popen(
                    [*torchrun(processes, port, nodes), __file__, *command],
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
    parser.add_argument("--sync-batchnorm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ceilings", action="store_true")
    parser.add_argument("--recipe", help="a recipe to run in 1 and in 2 processes")
    parser.add_argument("--set", action="append", default=[], help="recipe key=value")
    parser.add_argument("--noise", action="store_true", help="--recipe: 1 process, 2 more ways")
    parser.add_argument("--out", default=time.strftime("runs/bench_ddp/%Y%m%d-%H%M%S"))
    parser.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.allreduce_worker:
        allreduce_worker(args)
        return
    if args.recipe:
        recipe_runs(args)
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
    if args.ceilings:
        configs += [
            ("2 independent processes x 1 thread (no exchange)", {"independent": True}),
            ("2 processes, sync_batchnorm", {"processes": 2, "sync_batchnorm": True}),
        ]
    results: dict[str, list[float]] = {name: [] for name, _ in configs}
    extra: dict[str, dict] = {}
    for _ in range(args.rounds):  # alternating, so that drifts of a shared machine hit all
        for name, options in configs:
            row = independent(name, args) if options.get("independent") else None
            row = row or launch(name, args, **options)
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
    if args.ceilings:
        print(json.dumps(allreduce(args)), flush=True)


if __name__ == "__main__":
    main()
