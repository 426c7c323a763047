"""``python -m tests.kill_at``: runs ``python -m compress ARGS`` killed at a PHASE with
``os._exit`` — no cleanup, no finally, as SIGKILL or a power cut would — to test that
``--resume`` recovers from a kill at that moment.

It reads one JSON line per run from stdin, ``[PHASE, LOG, ARG, ...]``, runs it in a child
forked from this process (compress imported once, not once per kill: the forked child has run
no torch op, so its thread pools start fresh) with stdout and stderr to LOG, and answers
with the child's exit code on a line of its own.

Phases: ``training`` (after a stage's first training checkpoint), ``saving`` (a stage's
weights written, its folder not yet in place), ``saved`` (the stage's folder in place, before
its evaluation), ``evaluating`` (inside a stage's evaluation), ``report`` (report.md written,
report.json not yet).
"""

import importlib
import json
import os
import sys
import traceback

from compress.models import artifact
from compress.workflow import cli, pipeline, report

loop = importlib.import_module(
    "compress.training.train"
)  # the module; compress.train is the function


def die(*_args, **_kwargs):
    os._exit(137)


def after(function, condition=lambda *a, **k: True):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        if condition(*args, **kwargs):
            die()
        return result

    return wrapped


def kill_at(phase: str) -> None:
    if phase == "training":
        loop.save_checkpoint = after(loop.save_checkpoint, lambda path, *a: "stage" in str(path))
    elif phase == "saving":
        artifact.save_state = after(
            artifact.save_state, lambda model, folder, *a: "stage" in folder.name
        )
    elif phase == "saved":
        artifact.save = after(artifact.save, lambda model, path, *a: "stage" in path.name)
    elif phase == "evaluating":
        evaluate = pipeline.evaluate
        pipeline.evaluate = lambda *a, name, **k: (
            die() if name != "baseline" else evaluate(*a, name=name, **k)
        )
    elif phase == "report":
        write = report.write_atomic
        report.write_atomic = lambda path, content: (
            die() if path.name == "report.json" else write(path, content)
        )
    else:
        raise SystemExit(f"unknown phase {phase!r}")


def run_child(phase: str, log: str, argv: list[str]) -> None:
    """In the forked child: never returns to the parent's loop."""
    code = 1
    try:
        with open(log, "w") as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
        kill_at(phase)
        code = cli.main(argv)
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


for line in sys.stdin:
    phase, log, *argv = json.loads(line)
    child = os.fork()
    if child == 0:
        run_child(phase, log, argv)
    _, status = os.waitpid(child, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
