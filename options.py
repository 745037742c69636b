"""Every command's options: a dataclass whose fields are the options, read by argparse, and the error a user can fix.
--name=value and --name value both work; a bool takes true/false/1/0/yes/no, or a bare --name for true."""

import argparse
import dataclasses
import sys
import textwrap

from files import WriteError


class ConfigError(ValueError):
    """What a user can fix: one line `SCRIPT: error: ...`, exit code 2. every_rank: one rank may be the only one to
    see it (its own chunk of data), so every rank reports it."""

    def __init__(self, message, every_rank=False):
        super().__init__(message)
        self.every_rank = every_rank


def option(default, help, section=None, **argparse_args):
    """A dataclass field that is an option: its --help text and section, and argparse's nargs, metavar, choices,
    aliases (("-o",)), positional=True or type (text -> value, or a ValueError saying what it expected)."""
    return dataclasses.field(default=default, metadata={"help": help, "section": section, **argparse_args})


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, through the script's own error handling, not argparse's usage and exit
        raise ConfigError(f"{message} (see --help)")


def run(script, doc, config_class, argv, work, errors=(), read=None):
    """A command's main(): --help (exit code 0), or work(its options) -> the exit code (None: 0), the options read from
    argv by read(argv) (default: parse's config); a ConfigError or one of errors is one line `SCRIPT: error: ...` and
    exit code 2, a file that could not be written (files.WriteError) one line and exit code 1."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(config_class, script, doc))
        return 0
    try:
        return work(read(argv) if read else parse(config_class, argv)[0]) or 0
    except (ConfigError, *errors) as e:
        print(f"{script}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except WriteError as e:  # a full disk, say: the command's files are whole or absent, a rerun does the rest
        print(f"{script}: error: {e}", file=sys.stderr)
        return 1


def parse(config_class, argv):
    """(config_class with the options of argv, the names of the options given). Raises ConfigError."""
    cfg, given, rest = parse_known(config_class, argv)
    if rest and rest[0].startswith("--"):
        raise ConfigError(f"unknown option {rest[0].split('=', 1)[0]} (see --help for the options)")
    if rest:
        raise ConfigError(f"expected --name=value or --name value, got {rest[0]!r} (see --help)")
    return cfg, given


def parse_known(config_class, argv):
    """parse, for a command that passes what it does not know on: (config, names given, the rest of argv)."""
    parser = _Parser(add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    fields = dataclasses.fields(config_class)
    for f in fields:
        names = [f.name] if f.metadata.get("positional") else [f"--{f.name}", *f.metadata.get("aliases", ())]
        kw = {k: f.metadata[k] for k in ("nargs", "metavar") if k in f.metadata}
        if f.type is bool:
            kw.update(nargs="?", const="true")  # a bare --flag is true
        parser.add_argument(*names, **kw)  # dest: the field's name (the first long option's)
    given, rest = parser.parse_known_args(argv)
    values = {f.name: convert(f, getattr(given, f.name)) for f in fields if f.name in given}
    return config_class(**values), set(values), rest


def convert(field, text):
    """An option's text as its field's type (each item for nargs); ConfigError naming the option if it isn't one."""
    if isinstance(text, list):
        return [convert(field, item) for item in text]
    kind = field.metadata.get("type") or (str if field.type is list else field.type)
    choices = field.metadata.get("choices")
    try:
        value = parse_bool(text) if kind is bool else kind(text)
        if choices and value not in choices:
            raise ValueError(f"expected {', '.join(map(str, choices[:-1]))} or {choices[-1]}")
        return value
    except (ValueError, TypeError) as e:
        detail = str(e) if kind is bool or "type" in field.metadata or choices else f"expected {kind.__name__}"
        raise ConfigError(f"--{field.name}={text}: {detail}") from None


def parse_bool(text):
    value = text.strip().lower()
    if value not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError("expected true/false/1/0/yes/no")
    return value in ("true", "1", "yes")


class at_least:  # lower case: a type, as int and float are
    """A type for option(): the text as kind (int, float), checked to be >= low (NaN is not)."""

    def __init__(self, low, kind=int):
        self.low, self.kind, self.__name__ = low, kind, kind.__name__  # help_text names the type by __name__

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"expected {self.kind.__name__}") from None
        if not value >= self.low:
            raise ValueError(f"must be >= {self.low}")
        return value


def help_text(config_class, script, doc=""):
    """--help: the script's docstring, then every option with its default, type and help text, by section."""
    lines = [doc.strip(), ""] if doc.strip() else []
    lines.append(f"options of {script} (--name=value or --name value), with their defaults:")
    for f in dataclasses.fields(config_class):
        if f.metadata.get("section"):
            lines += ["", f"  {f.metadata['section']}"]
        kind = f.metadata.get("metavar") or getattr(f.metadata.get("type") or f.type, "__name__", "")
        name = f.name.upper() if f.metadata.get("positional") else f"--{f.name}={f.default!r}"
        aliases = "".join(f" {alias}" for alias in f.metadata.get("aliases", ()))
        line = f"    {name}{aliases} ({kind})" + (f"  {f.metadata['help']}" if f.metadata.get("help") else "")
        lines += textwrap.wrap(line, width=116, subsequent_indent=" " * 8, break_on_hyphens=False)
    return "\n".join(lines)
