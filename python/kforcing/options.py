"""Command-line options defined once: a config dataclass field carries its default, flag and help text.

`kforcing.cli` builds each subcommand's flags from these fields and the configs from the parsed flags, so a
default or a help text is written in one place.
"""

import dataclasses
from typing import List


def option(default=dataclasses.MISSING, help="", flag=None, convert=None, flag_default=dataclasses.MISSING, **cli):
    """A config field whose default and help text also define its command-line flag.

    flag: the flag name when it is not --field-name. convert: turns the flag's value into the field's value
    (e.g. "1,2,4" -> [1, 2, 4]); flag_default: the flag's default when it differs from the field's (its text
    form, "1,2,4"). cli: further argparse arguments (choices, action, type, required).
    """
    if flag_default is not dataclasses.MISSING:
        cli["default"] = flag_default
    metadata = {"help": help, "flag": flag, "convert": convert, "cli": cli}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_int_list(text: str, name: str) -> List[int]:
    """'1,2,4' -> [1, 2, 4], with a clear error naming the option."""
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers such as 1,2,4, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} is empty")
    return values


__all__ = ["option", "parse_int_list"]
