"""Command lines generated from dataclasses, so defaults live in one place (the dataclass).

Field names become `--kebab-case` options; bools become flags (`--name` sets True, `--no-name`
False); tuples take several values. Parsing has no side effects.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing


def build_parser(*classes, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in classes:
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            origin = typing.get_origin(kind)
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            elif origin is tuple:
                inner = typing.get_args(kind)[0]
                group.add_argument(flag, type=inner, nargs="+", default=default, metavar=f.name.upper())
            else:
                base = next((t for t in typing.get_args(kind) if t is not type(None)), kind) if origin else kind
                group.add_argument(flag, type=base, default=default, help=f"default: {default}")
    return parser


def split(namespace: argparse.Namespace, *classes):
    """One instance per dataclass from a parsed namespace."""
    values = vars(namespace)
    return tuple(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}) for cls in classes)


def parse_dataclass(cls, argv=None, description: str | None = None):
    """Parse `argv` (default sys.argv) into an instance of `cls`."""
    return split(build_parser(cls, description=description).parse_args(argv), cls)[0]
