"""`InputPath`: a model or data option that is a local path or a hub id, read relative to its config file.

A relative path written in a config file names a file or folder beside that config file when
one exists there (`configs/my_run.yaml` with `train_path: data/train.jsonl` reads
`configs/data/train.jsonl`, from whatever folder the command runs in); otherwise it is read
from the working directory, as a path given on the command line always is. A value that is
neither (a hub id such as `Qwen/Qwen3-1.7B`) is kept as written. Outputs (`trainer.default_root_dir`,
a logger's folder) are not `InputPath`s: runs are written under the working directory.
"""

from __future__ import annotations

import os

from jsonargparse.typing import register_type

__all__ = ["InputPath"]


class InputPath(str):
    """A local file or folder, or a hub id (the type of `model.student`, `data.train_path`, ...)."""


def _resolve(value: str) -> str:
    """The value as parsed: absolute when it names an existing path relative to the current folder, else as given.

    jsonargparse parses a config file's values with the current folder set to the file's own,
    and command-line values in the working directory.
    """
    if not isinstance(value, (str, os.PathLike)):  # e.g. None, for `InputPath | None` to take
        raise ValueError(f"expected a path or hub id, got {value!r}")  # "got None": the CLI reports it missing
    value = os.fspath(value)
    path = os.path.expanduser(value)
    if not os.path.isabs(path) and os.path.exists(path):
        return os.path.abspath(path)
    return value


register_type(InputPath, serializer=str, deserializer=_resolve)
