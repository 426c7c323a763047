"""A user's own text for language models: any UTF-8 file or folder of ``*.txt`` files under
``data.root``, by character (as ``shakespeare_char``) or by a Hugging Face tokenizer found
locally (``data.tokenizer``: a ``tokenizer.json`` file or the folder holding it).

Splits: ``train/`` and ``test/`` sub-folders (or ``train.txt`` and ``test.txt``) where the
root has them; else whole files in name order, train taking files until it holds 90 % of
the characters (:func:`compress.data.shakespeare.character_split`), so no file is cut
between the two; a single file is cut once, at the line nearest 90 %. Each split is cut into
non-overlapping blocks of ``data.context`` tokens.

Read as data: each file bounded by :data:`MAX_FILE_BYTES`, the corpus by
:data:`MAX_CORPUS_BYTES`; the tokenizer is the ``tokenizers`` library's JSON (a vocabulary
and merge rules, no code), bounded too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.core.errors import DataError
from compress.core.registry import register_dataset
from compress.data.shakespeare import TRAIN_SHARE, blocks, character_split
from compress.spec.recipe import DataConfig

MAX_FILE_BYTES = 1 << 28  # 256 MiB: a text file beyond it is not read whole
MAX_CORPUS_BYTES = 1 << 30
MAX_TOKENIZER_BYTES = 1 << 26  # Llama-3's tokenizer.json is 9 MB
MAX_FILES = 100_000


@register_dataset("text", task="language_model")
def text(config: DataConfig, mean: list[float], std: list[float], seed: int):
    """A UTF-8 file or folder of .txt files under data.root (characters, or data.tokenizer)."""
    if not config.root:
        raise DataError("data.root: the text dataset needs a UTF-8 file or a folder of .txt files")
    train_text, test_text = text_splits(Path(config.root))
    if config.tokenizer:
        tokenizer = _tokenizer(Path(config.tokenizer))
        vocabulary = tokenizer.get_vocab_size()

        def encode(part: str) -> torch.Tensor:
            return torch.tensor(tokenizer.encode(part).ids, dtype=torch.long)

    else:
        characters = sorted(set(train_text) | set(test_text))
        index = {c: i for i, c in enumerate(characters)}
        vocabulary = len(characters)

        def encode(part: str) -> torch.Tensor:
            return torch.tensor([index[c] for c in part], dtype=torch.long)

    return (
        blocks(encode(train_text), config.context),
        blocks(encode(test_text), config.context),
        vocabulary,
    )


def text_splits(root: Path) -> tuple[str, str]:
    """Train and test text under ``root`` (see the module's docstring for the rule).

    Example:
        >>> train, test = text_splits(Path("my_corpus"))  # my_corpus/train/, my_corpus/test/
    """
    if root.is_file():
        whole = _read(root)
        cut = whole.rfind("\n", 0, int(TRAIN_SHARE * len(whole))) + 1 or int(
            TRAIN_SHARE * len(whole)
        )
        return whole[:cut], whole[cut:]
    if not root.is_dir():
        raise DataError(f"data.root: {str(root)!r} is neither a file nor a folder")
    for train, test in ((root / "train", root / "test"), (root / "train.txt", root / "test.txt")):
        if train.exists() and test.exists():
            return _joined(train), _joined(test)
    return character_split(_texts(root))


def _texts(root: Path) -> dict[str, str]:
    files = sorted(root.rglob("*.txt")) if root.is_dir() else [root]
    if not files:
        raise DataError(f"data.root: {root} holds no .txt file")
    if len(files) > MAX_FILES:
        raise DataError(f"data.root: {root} holds over {MAX_FILES} .txt files; refused")
    if sum(f.stat().st_size for f in files) > MAX_CORPUS_BYTES:
        raise DataError(f"data.root: {root} holds over {MAX_CORPUS_BYTES} bytes of text; refused")
    return {str(f.relative_to(root) if root.is_dir() else f.name): _read(f) for f in files}


def _joined(path: Path) -> str:
    return "\n\n".join(_texts(path).values())


def _read(file: Path) -> str:
    if file.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"data.root: {file} is over {MAX_FILE_BYTES} bytes; refused")
    try:
        return file.read_bytes().decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as error:
        raise DataError(
            f"data.root: {file} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None


def _tokenizer(path: Path):
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"data.tokenizer: {str(path)!r} holds no tokenizer.json; allowed: a tokenizer.json"
            " file or a folder with one (a Hugging Face tokenizer saved locally)"
        )
    if file.stat().st_size > MAX_TOKENIZER_BYTES:
        raise DataError(f"data.tokenizer: {file} is over {MAX_TOKENIZER_BYTES} bytes; refused")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            "data.tokenizer needs the tokenizers package (make setup installs it)"
        ) from None
    try:
        return Tokenizer.from_str(file.read_text(encoding="utf-8"))
    except Exception as error:  # noqa: BLE001 - the library's parse errors: one line
        raise DataError(
            f"data.tokenizer: {file} is not a tokenizers JSON ({str(error)[:200]})"
        ) from None
