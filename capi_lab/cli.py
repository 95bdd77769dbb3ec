"""Command-line options generated from typed dataclasses, and YAML config files.

Every field of a config dataclass becomes a flag (``--batch-size``, ``--optim.lr``,
``--mask.strategy``, ``--model.drop-path-rate``; underscores work too) whose parser is derived from
the field's type; its docstring is the help text. Only the flags a user gives become overrides, so
the precedence is: preset < ``--config FILE.yaml`` < flags.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _none_or(parse: Any) -> Any:
    def f(s: str) -> Any:
        return None if s.lower() in ("none", "null") else parse(s)

    f.__name__ = getattr(parse, "__name__", "value")
    return f


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", flatten: frozenset[str] = frozenset()
) -> None:
    """Add one flag per field of dataclass ``cls``, recursing into nested dataclass fields as
    ``--section.field`` (or without the section for the names in ``flatten``). Values land in the
    namespace under their dotted path; defaults are omitted, so only given flags are overrides."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        dest = prefix + f.name
        if dataclasses.is_dataclass(tp):
            add_dataclass_arguments(parser, tp, prefix="" if f.name in flatten else dest + ".")
            continue
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": docs.get(f.name, "")}
        optional = False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = len(args) < len(typing.get_args(tp))
            tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif origin is Literal:
            kwargs.update(choices=list(typing.get_args(tp)))
        elif origin is tuple:
            item = typing.get_args(tp)[0]
            kwargs.update(type=item, nargs=len(typing.get_args(tp)))
        elif tp in (int, float, str):
            kwargs.update(type=_none_or(tp) if optional else tp, metavar=tp.__name__.upper())
        else:
            kwargs.update(type=str)
        names = {"--" + dest.replace("_", "-"), "--" + dest}
        parser.add_argument(*sorted(names, key=len), **kwargs)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1}`` -> ``{"optim": {"lr": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return out


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, ``new`` winning."""
    out = dict(base)
    for k, v in new.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"error: config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: config file {str(path)!r} must hold a mapping of settings, not {type(data).__name__}")
    return data


def write_yaml(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
