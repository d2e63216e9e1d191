"""``include:`` in a config file: the shared pieces (``configs/base/*.yaml``) a config builds on.

A config names the files it builds on, relative to itself, in a top-level ``include`` key::

    # configs/tiny.yaml
    include: [base/trainer.yaml, base/callbacks.yaml, base/optimizer.yaml]
    trainer:
      max_steps: 250

``--config configs/tiny.yaml`` then stands for ``--config configs/base/trainer.yaml --config
configs/base/callbacks.yaml --config configs/base/optimizer.yaml --config configs/tiny.yaml``: jsonargparse
merges the files exactly as it merges repeated ``--config`` flags. Later files win key by key, the ``init_args``
of an unchanged ``class_path`` merge, and a list (``trainer.callbacks``) is replaced whole, never merged. An
included file may include others; each file is read once on a command line (depth-first, includes before the
includer) and a cycle is an error. ``--print_config`` prints the merged result, with no ``include`` left in it.

Why not jsonargparse's own: recent jsonargparse releases read a ``config:`` key inside a config file, but the
versions this project supports (4.40 on the GPU image) reject it; this is the same idea in ~50 lines, done
before jsonargparse sees the command line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import yaml
from jsonargparse import get_loader, set_loader

INCLUDE_KEY = "include"
# The parser mode of the dsv3 CLI: jsonargparse's YAML, with the already expanded ``include`` key dropped.
PARSER_MODE = "yaml_with_includes"


def _read(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return get_loader("yaml")(f.read())


def _includes(path: str) -> list[str]:
    data = _read(path)
    names = data.get(INCLUDE_KEY, []) if isinstance(data, dict) else []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: {INCLUDE_KEY} must be a file path or a list of paths, got {names!r}")
    here = os.path.dirname(path)
    return [os.path.normpath(os.path.join(here, n)) for n in names]


def config_chain(path: str | os.PathLike, merged: Sequence[str] = ()) -> list[str]:
    """The files ``--config path`` stands for, in merge order: its includes (recursively), then ``path``; files
    in ``merged`` (already read earlier on the command line) are left out."""
    chain: list[str] = []

    def visit(file: str, stack: tuple[str, ...]) -> None:
        if file in stack:
            raise ValueError(f"{INCLUDE_KEY} cycle: {' -> '.join((*stack, file))}")
        if file in chain or file in merged:
            return
        if not os.path.isfile(file):
            where = f" (included by {stack[-1]})" if stack else ""
            raise FileNotFoundError(f"config file {file}{where}: no such file")
        for included in _includes(file):
            visit(included, (*stack, file))
        chain.append(file)

    visit(os.path.normpath(os.fspath(path)), ())
    return chain


def config_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Every file that ``--config p`` for each of ``paths`` reads, in merge order, each once."""
    files: list[str] = []
    for path in paths:
        files += config_chain(path, files)
    return files


def expand_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config FILE`` (or ``--config=FILE``) replaced by one ``--config`` per file of its
    chain, each file once on the whole command line: a second config including the same base does not reset what
    the first one changed. Expanding twice changes nothing. A ``--config`` value that is no file (an inline YAML
    string) is left as it is."""
    out: list[str] = []
    merged: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--config":
            value = next(it, None)
        elif arg.startswith("--config="):
            value = arg.removeprefix("--config=")
        else:
            out.append(arg)
            continue
        if value is None or not os.path.isfile(value):
            out += ["--config"] + ([] if value is None else [value])
            continue
        for file in config_chain(value, merged):
            merged.append(file)
            out += ["--config", file]
    return out


def _load_without_include(text: str) -> Any:
    data = get_loader("yaml")(text)
    if isinstance(data, dict):
        data.pop(INCLUDE_KEY, None)
    return data


set_loader(PARSER_MODE, _load_without_include, exceptions=(yaml.YAMLError,))
