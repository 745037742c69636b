"""options.py: a dataclass's fields as a command's options (--name=value and --name value), --help from their
metadata, one-line errors."""

from dataclasses import dataclass

import pytest

import options
from options import ConfigError, option


@dataclass
class Options:
    name: str = option("a # not a comment", "text with a '# ' in its default", section="first section")
    count: int = option(3, "how many")
    rate: float = option(0.5, "")
    flag: bool = option(False, "on or off", section="second section")


def test_parse_args_types_defaults_and_errors():
    cfg, given = options.parse(Options, ["--count=7", "--flag=yes", "--name=x=y"])
    assert (cfg.name, cfg.count, cfg.rate, cfg.flag) == ("x=y", 7, 0.5, True) and given == {"count", "flag", "name"}
    for argv, message in [(["--nope=1"], "unknown option --nope"), (["--count=1.5"], "--count=1.5: expected int"),
                          (["--flag=maybe"], "--flag=maybe: expected true/false/1/0"), (["count=1"], "--name=value")]:
        with pytest.raises(ConfigError, match=message):
            options.parse(Options, argv)


def test_usage_lists_every_option_under_its_section():
    text = options.help_text(Options, "x.py", "Doc line.\n\n    python x.py")
    assert text.startswith("Doc line.")
    assert "options of x.py (--name=value or --name value), with their defaults:" in text
    # a default holding "# " is printed whole (the old source-parsing --help cut it there)
    assert "\n  first section\n    --name='a # not a comment' (str)  text with a '# ' in its default\n" in text
    assert "    --count=3 (int)  how many\n    --rate=0.5 (float)\n\n  second section\n    --flag=False (bool)" in text


def test_both_spellings_and_a_bare_flag():
    """--name value and --name=value give the same; a bool alone is true and takes a value too."""
    assert options.parse(Options, ["--count", "7", "--name", "x y"])[0] == options.parse(Options, ["--count=7",
                                                                                               "--name=x y"])[0]
    assert options.parse(Options, ["--flag"])[0].flag is True
    assert options.parse(Options, ["--flag", "false", "--count", "2"])[0] == Options(flag=False, count=2)
    assert options.parse(Options, ["--rate", "-1.5"])[0].rate == -1.5  # a negative number is a value
    for argv, message in [(["--count"], "argument --count: expected one argument"),
                          (["--nope", "1"], "unknown option --nope"), (["--cou=1"], "unknown option --cou")]:
        with pytest.raises(ConfigError, match=message):
            options.parse(Options, argv)
