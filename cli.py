"""One command-line style for train.py, eval.py, data.py and generate.py: the options are a frozen
dataclass whose fields carry their --help text, argparse is generated from it, and a user's
mistake is one line on stderr with exit status 2, never a traceback.
"""
import argparse
import sys
import typing
from dataclasses import MISSING, field, fields


def knob(default, help, **argparse_keywords):
    """An options field: its default, its --help text, and argparse keywords (choices, ...)."""
    return field(default=default, metadata={"help": help, **argparse_keywords})


def needed(help, positional=False):
    """An options field the user must give: a required --flag, or the positional arguments."""
    return field(metadata={"help": help, "positional": positional})


def fail(program, message):
    """A user's mistake: one line on stderr, exit status 2 (argparse's), no traceback."""
    sys.stderr.write(f"{program}: error: {message}\n")
    raise SystemExit(2)


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written; every flag's default after its help, unless the help
    already says it or there is none to show."""
    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), as every other error here; a
    subcommand's errors name the program ("data.py prepare" -> "data.py")."""
    def error(self, message):
        program = self.prog.split()[0]
        fail(program, f"{message} (see --help)")


def flag_type(annotation):
    """The type argparse converts a flag's text to: int for `int | None`."""
    types = [t for t in typing.get_args(annotation) if t is not type(None)]
    if types:
        return types[0]
    return annotation


def add_options(parser, options):
    """A --flag per field of the options dataclass (positional fields: the arguments), its help
    and argparse keywords from the field's metadata."""
    for f in fields(options):
        flag = f"--{f.name.replace('_', '-')}"
        keywords = {k: v for k, v in f.metadata.items() if k != "positional"}
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+", **keywords)
        elif f.type is bool:
            parser.add_argument(flag, action="store_true", default=f.default, **keywords)
        elif f.default is MISSING:  # required: SUPPRESS shows no "(default: None)"
            parser.add_argument(flag, type=flag_type(f.type), required=True,
                                default=argparse.SUPPRESS, **keywords)
        else:
            parser.add_argument(flag, type=flag_type(f.type), default=f.default, **keywords)


def parser_for(options, program, description):
    """The parser of one options dataclass."""
    parser = Parser(prog=program, description=description, formatter_class=Formatter)
    add_options(parser, options)
    return parser
