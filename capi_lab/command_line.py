"""The command lines of capi_lab (training, evaluation, features, visualisations, the shard writer), built by
jsonargparse from the typed config dataclasses: every field is a flag whose type is checked and whose attribute
docstring is its ``--help`` text; ``--config FILE.yaml`` reads the same keys; ``--print_config`` prints the
resolved settings.

Two conveniences on top of jsonargparse, both in :func:`normalise_argv`:

* dashes and underscores are the same in a flag's name (``--max-steps`` is ``--max_steps``,
  ``--model.num-prototypes`` is ``--model.num_prototypes``); ``--help`` lists the underscore form;
* a boolean flag given alone means true (``--compile`` is ``--compile true``), and a fixed-length tuple takes
  its values one by one (``--crop-scale 0.3 1.0`` is ``--crop_scale [0.3,1.0]``).

``--config`` files are applied before any flag, wherever they stand, so the precedence is always
defaults (a preset) < file < flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace, set_parsing_settings

from capi_lab.config import ConfigError

set_parsing_settings(docstring_parse_attribute_docstrings=True)

CONFIG_FLAG = "--config"


def _field_flags(cls: type, prefix: str, flatten: frozenset[str]) -> dict[str, Any]:
    """``--name`` -> type of every field of dataclass ``cls``, nested dataclasses as ``--section.name`` (or
    without the section for the field names in ``flatten``), ``X | None`` as ``X``."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_field_flags(tp, "" if f.name in flatten else f"{prefix}{f.name}.", frozenset()))
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
        out[f"--{prefix}{f.name}"] = tp
    return out


def shorthand_flags(cls: type, flatten: frozenset[str] = frozenset()) -> dict[str, int]:
    """The flags of dataclass ``cls`` that :func:`normalise_argv` completes: booleans (value 0: ``--flag``
    alone is true) and fixed-length tuples (value n: ``--flag A B`` is ``--flag [A,B]``)."""
    out = {}
    for flag, tp in _field_flags(cls, "", flatten).items():
        if tp is bool:
            out[flag] = 0
        elif typing.get_origin(tp) is tuple and Ellipsis not in typing.get_args(tp):
            out[flag] = len(typing.get_args(tp))
    return out


def normalise_argv(argv: Sequence[str], shorthands: dict[str, int] | None = None) -> list[str]:
    """Underscores for dashes in flag names; for the flags in ``shorthands`` (:func:`shorthand_flags`)
    ``--flag`` alone -> ``--flag=true`` and ``--flag A B`` -> ``--flag=[A,B]``; and every ``--config FILE``
    moved to the front (files before flags)."""
    shorthands = shorthands or {}
    configs: list[str] = []
    rest: list[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token.partition("=")
            name = "--" + name[2:].replace("-", "_")
            if name == CONFIG_FLAG:
                if eq:
                    configs += [name, value]
                elif i + 1 < len(argv):
                    configs += [name, argv[i + 1]]
                    i += 1
                else:
                    configs.append(name)  # jsonargparse reports the missing value
                i += 1
                continue
            n = shorthands.get(name)
            following = argv[i + 1 : i + 1 + (n or 1)]
            if not eq and n == 0 and not (following and following[0].lower() in _BOOL_WORDS):
                token = f"{name}=true"
            elif not eq and n and len(following) == n and not any(v.startswith(("--", "[")) for v in following):
                token = f"{name}=[{','.join(following)}]"
                i += n
            else:
                token = f"{name}{eq}{value}"
        rest.append(token)
        i += 1
    return configs + rest


_BOOL_WORDS = ("true", "false", "yes", "no", "1", "0", "on", "off")


def config_files(argv: Sequence[str]) -> list[Path]:
    """The ``--config`` files of a normalised argv, in order."""
    return [Path(argv[i + 1]) for i in range(len(argv) - 1) if argv[i] == CONFIG_FLAG]


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The last value given to ``flag`` in a normalised argv (``--flag V`` or ``--flag=V``), else None."""
    found = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith(flag + "="):
            found = token[len(flag) + 1 :]
    return found


def new_parser(prog: str, description: str, config_help: str = "YAML file of settings") -> ArgumentParser:
    """A parser that raises instead of exiting (:func:`clear_errors` turns its errors into one line), with
    ``--config`` and ``--print_config``."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument(CONFIG_FLAG, action="config", help=config_help)
    return parser


@contextlib.contextmanager
def clear_errors(prog: str | None = None, subcommands: Sequence[str] = ()) -> Iterator[None]:
    """A bad flag, value or file (jsonargparse's errors and the configs' own :class:`ConfigError`) exits with
    ``error: ...`` on one line, and with ``prog`` the hint to its ``--help``. ``subcommands``: names whose
    ``NAME.field`` in jsonargparse's messages is shown as the flag ``--field``."""
    try:
        yield
    except (ArgumentError, ConfigError) as e:
        message = " ".join(str(e).split())
        for name in subcommands:
            message = re.sub(rf"(?<![\w-]){re.escape(name)}\.(\w)", r"--\1", message)
        hint = f"\n(run `{prog} --help` for the options)" if prog else ""
        raise SystemExit(f"error: {message}{hint}") from None


def require_positive(config: object, *names: str) -> None:
    """:class:`ConfigError` naming the flag when one of the fields ``names`` of ``config`` is <= 0 (None is unset)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def instantiate(cls: type, values: dict[str, Any] | Namespace, **extra: Any) -> Any:
    """``cls(**values, **extra)`` from a parsed namespace (nested dataclasses are already built)."""
    if isinstance(values, Namespace):
        values = dict(vars(values))
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names}, **extra)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of settings; a missing, invalid or non-mapping file exits with a clear error."""
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


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def subcommand_parser(prog: str, description: str, tasks: dict[str, type]) -> ArgumentParser:
    """A parser with one subcommand per entry of ``tasks`` (name -> config dataclass), each with its own
    flags, ``--config`` and ``--print_config``."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    sub = parser.add_subcommands(dest="task", required=True)
    for name, cls in tasks.items():
        doc = (cls.__doc__ or "").split("\n\n")[0]
        p = new_parser(f"{prog} {name}", doc)
        p.add_class_arguments(cls, nested_key=None)
        sub.add_subcommand(name, p, help=doc)
    return parser
