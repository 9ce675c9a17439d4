"""Command-line mistakes as one ``error:`` line with a "did you mean", never a page of usage.

* :func:`check_config_files` looks at every ``--config``/``-c`` file of a training command before
  torch and Lightning are imported (a typo fails in well under a second): a missing file names the
  nearest file beside it (``configs/quickstart.yml`` -> ``configs/quickstart.yaml``), a file that is
  not text says so.
* :func:`explain_jsonargparse_error` turns a LightningCLI/jsonargparse parse error (raised instead of
  printed: ``exit_on_error=False``) into one line: an unknown flag names the nearest known one
  (``--trainer.max_step`` -> ``--trainer.max_steps``), an unknown nested field (``--model.ppo.mini_batch``)
  the nearest field of its settings class, and a multi-line type error is joined into one line.
* :class:`OneLineArgumentParser` is argparse for the tool subcommands with the same behaviour.
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

from stepsearch.errors import StepSearchError

CONFIG_FLAGS = ("--config", "-c")


def nearest(word: str, choices, cutoff: float = 0.6) -> str | None:
    """The closest of ``choices`` to ``word`` (difflib ratio >= ``cutoff``), else ``None``."""
    found = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=cutoff)
    return found[0] if found else None


def did_you_mean(word: str, choices, cutoff: float = 0.6) -> str:
    """`` (did you mean X?)`` for the closest choice, or an empty string."""
    match = nearest(word, choices, cutoff)
    return f" (did you mean {match}?)" if match else ""


def nearest_file(path: Path) -> Path | None:
    """The file beside ``path`` whose name is closest to its name (``quickstart.yml`` -> ``quickstart.yaml``)."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [p.name for p in parent.iterdir() if p.is_file()]
    except OSError:
        return None
    match = nearest(path.name, names)
    return parent / match if match else None


def check_file_argument(flag: str, value: str) -> None:
    """A file named on the command line exists and is text; else one line (with the nearest name)."""
    path = Path(value).expanduser()
    if not path.exists():
        near = nearest_file(path)
        hint = f" (did you mean {near}?)" if near else ""
        raise StepSearchError(f"{flag} {value}: no such file{hint}")
    if path.is_dir():
        raise StepSearchError(f"{flag} {value}: is a directory, not a config file")
    try:
        head = path.read_bytes()[:65536]
    except OSError as err:
        raise StepSearchError(f"{flag} {value}: cannot read ({err.strerror})") from None
    try:
        if b"\0" in head:
            raise UnicodeDecodeError("utf-8", head, 0, 1, "NUL byte")
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.reason == "unexpected end of data" and len(head) == 65536:
            return  # a multi-byte character cut at the sample's end
        raise StepSearchError(f"{flag} {value}: not a text file (a YAML or JSON config is expected)") from None


def check_config_files(argv: list[str]) -> None:
    """Every ``--config FILE``/``--config=FILE``/``-c FILE`` of ``argv`` is an existing text file."""
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag not in CONFIG_FLAGS:
            continue
        if not _:
            if i + 1 >= len(argv):
                continue  # the parser reports the missing value
            value = argv[i + 1]
        if value.lstrip().startswith(("{", "[")) or "\n" in value:
            continue  # an inline YAML/JSON config, not a path
        check_file_argument(flag, value)


# ---------------------------------------------------------------------------------------- jsonargparse

def _option_strings(parser) -> list[str]:
    """Every ``--flag`` a jsonargparse/argparse parser (and its subcommand parsers) accepts."""
    flags: list[str] = []
    stack = [parser]
    while stack:
        current = stack.pop()
        flags += [s for s in getattr(current, "_option_string_actions", {}) if s.startswith("--")]
        for action in getattr(current, "_actions", []):
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):
                stack += [p for p in choices.values() if hasattr(p, "_actions")]
    return flags


def _class_fields(class_path: str) -> list[str]:
    import dataclasses
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    try:
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return []


def explain_jsonargparse_error(parser, message: str) -> str:
    """One line for a jsonargparse parse error ``message`` of ``parser`` (see the module docstring)."""
    unknown = re.match(r"unrecognized arguments: (.*)", message, re.S)
    if unknown:
        flags = [t.split("=", 1)[0] for t in unknown.group(1).split() if t.startswith("--")]
        known = _option_strings(parser)
        parts = [f"{flag}{did_you_mean(flag, known)}" for flag in flags] or [unknown.group(1).strip()]
        return f"unknown option {', '.join(parts)} (`fit --help` lists them; flags are never abbreviated)"
    key = re.match(r'Parser key "([^"]+)":', message)
    field = re.search(r"Option '([^']+)' is not accepted", message)
    if key and field:
        class_path = re.search(r"class_path '([^']+)'", message)
        fields = _class_fields(class_path.group(1)) if class_path else []
        flag = f"--{key.group(1)}.{field.group(1)}"
        match = nearest(field.group(1), fields)
        hint = f" (did you mean --{key.group(1)}.{match}?)" if match else ""
        return f"unknown option {flag}: {key.group(1)} has no field {field.group(1)!r}{hint}"
    lines = [line.strip(" -") for line in message.splitlines() if line.strip()]
    # A Union's noise: keep the reasons, drop the subtype list and the "expected None" alternative.
    reasons = [line for line in lines[1:] if not line.startswith(("Does not validate", "Subtypes:", "Errors:",
                                                                  "Given value type:", "Expected a <class 'NoneType'>"))]
    return " ".join([lines[0], *reasons]) if lines else message


def stepsearch_cause(err: BaseException) -> StepSearchError | None:
    """The first StepSearchError in ``err``'s cause/context chain, if any (jsonargparse wraps a
    validation error of ours, raised while it instantiates a settings dataclass, in its own errors)."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StepSearchError):
            return current
        stack += [current.__cause__, current.__context__]
    return None


def parse_lightning_arguments(parse, parser, subcommand_parsers, args) -> None:
    """Run LightningCLI's ``parse(parser, args)`` with jsonargparse raising instead of printing usage;
    a parse error becomes one :class:`StepSearchError` line (ours as it is, else explained)."""
    for each in (parser, *subcommand_parsers):
        each.exit_on_error = False
    try:
        parse(parser, args)
    except argparse.ArgumentError as err:
        ours = stepsearch_cause(err)
        if ours is not None:
            raise ours from None
        raise StepSearchError(explain_jsonargparse_error(parser, str(err))) from None


# ---------------------------------------------------------------------------------------------- argparse

class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`StepSearchError` line (with a "did you mean") instead of
    usage + error; subcommand parsers made by ``add_subparsers`` are of this class too."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (.*)", message, re.S)
        if unknown:
            flags = [t.split("=", 1)[0] for t in unknown.group(1).split() if t.startswith("-")]
            known = _option_strings(self)
            parts = [f"{flag}{did_you_mean(flag, known)}" for flag in flags] or [unknown.group(1).strip()]
            message = f"unknown option {', '.join(parts)}"
        choice = re.match(r"argument (.*): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"'([^']*)'", choice.group(3))
            message += did_you_mean(choice.group(2), options)
        raise StepSearchError(f"{self.prog}: {message} (`{self.prog} --help` for usage)")


def subcommand_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser ``argv`` reaches: ``evaluate --x`` -> the ``evaluate`` parser."""
    current = parser
    for token in argv:
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            break
        if token in sub.choices:
            current = sub.choices[token]
    return current


def parse_args_one_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with unknown flags reported by the subcommand they were given to
    (so "did you mean" draws on that command's flags only)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        subcommand_parser(parser, argv).error("unrecognized arguments: " + " ".join(extra))
    return args
