"""Makers of hostile inputs for tests/test_hostile.py: a payload module that leaves a marker
file when imported or called, and model folders, weight files and data files tampered with
the way an attacker would."""

from __future__ import annotations

import hashlib
import json
import lzma
import zipfile
from pathlib import Path

import torch

PAYLOAD = """
import os, pathlib
pathlib.Path(os.environ["COMPRESS_TEST_MARKER"]).write_text("payload ran")

def make(**kwargs):
    pathlib.Path(os.environ["COMPRESS_TEST_MARKER"]).write_text("payload called")
    import torch
    return torch.nn.Linear(1, 1)
"""


class Payload:
    """Unpickling this runs ``os.system`` (as real exploits do): it writes the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"echo payload ran > {self.marker}",))


def write_payload_module(folder: Path) -> str:
    """A module ``evil_payload`` in ``folder``; returns its import path for a spec."""
    (folder / "evil_payload.py").write_text(PAYLOAD)
    return "evil_payload:make"


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def edit_graph(folder: Path, change) -> None:
    graph = json.loads((folder / "graph.json").read_text())
    change(graph)
    (folder / "graph.json").write_text(json.dumps(graph))


def chain(length: int, operation: str = "aten.relu.default"):
    """A graph edit: ``length`` more operations chained before the output (a small file,
    ~120 bytes a node, that costs work in proportion to its nodes)."""

    def change(graph):
        output = graph["nodes"].pop()
        last = len(graph["nodes"]) - 1
        for index in range(last + 1, last + 1 + length):
            graph["nodes"].append(
                {
                    "op": "call_function",
                    "target": operation,
                    "args": {"tuple": [{"node": index - 1}]},
                    "kwargs": {"dict": {}},
                }
            )
        output["args"] = {"node": len(graph["nodes"]) - 1}
        graph["nodes"].append(output)

    return change


def rezip(file: Path, duplicate: str | None = None, deflate: bool = False) -> None:
    """Rewrite a torch.save zip: entries deflated, or a second entry named as the one that
    ends in ``duplicate`` (holding a pickle of None), which one reader may take and
    another not."""
    with zipfile.ZipFile(file) as source:
        entries = [(info.filename, source.read(info)) for info in source.infolist()]
    extra = None
    if duplicate is not None:
        extra = (next(n for n, _ in entries if n.endswith(duplicate)), b"\x80\x04N.")
    compression = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(file, "w", compression) as target:
        for name, data in entries:
            target.writestr(name, data)
        if extra is not None:
            import warnings

            with warnings.catch_warnings():  # "Duplicate name": the point of this file
                warnings.simplefilter("ignore")
                target.writestr(*extra)


def lzma_bomb(megabytes: int) -> torch.Tensor:
    """An LZMA stream of ``megabytes`` MB of zeros (a few hundred KB) as uint8."""
    compressor = lzma.LZMACompressor(preset=0)
    chunk = bytes(1 << 20)
    data = b"".join(compressor.compress(chunk) for _ in range(megabytes)) + compressor.flush()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: what an attack must leave as it was."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }
