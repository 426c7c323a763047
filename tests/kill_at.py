"""``python -m tests.kill_at PHASE ARGS...``: run ``python -m compress ARGS`` and kill the
process at PHASE with ``os._exit`` — no cleanup, no finally, as SIGKILL or a power cut
would — to test that ``--resume`` recovers from a kill at that moment.

Phases: ``training`` (after a stage's first training checkpoint), ``saving`` (a stage's
weights written, its folder not yet in place), ``saved`` (the stage's folder in place, before
its evaluation), ``evaluating`` (inside a stage's evaluation), ``report`` (report.md written,
report.json not yet).
"""

import importlib
import os
import sys

from compress import artifact, cli, pipeline, report

loop = importlib.import_module("compress.train")  # the module; compress.train is the function


def die(*_args, **_kwargs):
    os._exit(137)


def after(function, condition=lambda *a, **k: True):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        if condition(*args, **kwargs):
            die()
        return result

    return wrapped


phase, argv = sys.argv[1], sys.argv[2:]
if phase == "training":
    loop._save_checkpoint = after(loop._save_checkpoint, lambda path, *a: "stage" in str(path))
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
sys.exit(cli.main(argv))
