"""Command lines generated from dataclasses, so defaults live in one place (the dataclass).

Field names become `--kebab-case` options; bools become flags (`--name` sets True, `--no-name`
False); tuples take several values; a field without a default is a required option; a field's
`metadata={"help": ...}` is its help text. Parsing has no side effects.

`run_command` is how every command line of the package runs: a user error prints one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from collections.abc import Callable

# What a user's input (options, files, folders) raises at the public boundary. Anything else is a
# bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               MemoryError)


def check_ranges(config, rules: dict[str, tuple[Callable[[object], bool], str]]) -> None:
    """Raise ValueError for the first field of `config` whose value fails its rule:
    rules maps a field name to (predicate, what was expected), e.g. {"lr": (positive, "> 0")}."""
    for name, (ok, expected) in rules.items():
        value = getattr(config, name)
        if not ok(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {value!r}")


def at_least(low: float) -> tuple[Callable[[object], bool], str]:
    return (lambda v: math.isfinite(v) and v >= low), f">= {low:g}"


def one_of(choices) -> tuple[Callable[[object], bool], str]:
    choices = list(choices)
    return (lambda v: v in choices), f"one of {choices}"


POSITIVE = ((lambda v: math.isfinite(v) and v > 0), "a finite number > 0")


def check_device(device: str) -> None:
    """Raise ValueError for a device torch cannot use here (e.g. cuda on a machine without CUDA)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device ({e}); expected cpu or cuda[:N]") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asks for CUDA, which this machine (or this torch build) does not have; "
                         "use --device cpu")


def check_backend(backend: str, device: str) -> None:
    """Raise ValueError now, not at the first forward, when kernels backend `backend` cannot run
    on `device` (triton without CUDA or the interpreter, keops without a compiler, a typo)."""
    import torch

    import kernels

    try:
        kernels.dispatch.resolve("softmax", backend, torch.device(device), 1)
    except ValueError as e:
        raise ValueError(f"--backend {backend}: {e}") from None


def run_command(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run `main(argv)` (default: sys.argv[1:]) as a command. A user error (USER_ERRORS) prints
    `error: <message>` on one line to stderr and exits with status 2, like argparse's own errors;
    `--debug` anywhere in argv shows the full traceback instead. Exits 0 on success."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


def build_parser(*classes, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in classes:
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = " ".join(filter(None, [f.metadata.get("help", ""), "(required)" if required else
                                          f"(default: {default})"]))
            origin = typing.get_origin(kind)
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            elif origin is tuple:
                inner = typing.get_args(kind)[0]
                group.add_argument(flag, type=inner, nargs="+", default=default, metavar=f.name.upper(), help=text)
            else:
                base = next((t for t in typing.get_args(kind) if t is not type(None)), kind) if origin else kind
                group.add_argument(flag, type=base, default=default, required=required, help=text)
    return parser


def split(namespace: argparse.Namespace, *classes):
    """One instance per dataclass from a parsed namespace."""
    values = vars(namespace)
    return tuple(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}) for cls in classes)


def parse_dataclass(cls, argv=None, description: str | None = None):
    """Parse `argv` (default sys.argv) into an instance of `cls`."""
    return split(build_parser(cls, description=description).parse_args(argv), cls)[0]
