"""Every command line README and docs/ show is parsed by the program it names, so the manual and `--help` cannot
drift apart: `dvae` lines by the command's own parser (options, values, arguments), `dvc` lines by DVC's, benchmark
lines by the script's argparse parser, and `pip install` extras against pyproject.toml. Nothing is run."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from conftest import benchmark_module

from dvae_cli.cli import app

PROJECT = Path(__file__).resolve().parents[1]
PAGES = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
PROGRAMS = ("dvae", "dvc", "python", "torchrun", "pip")
INLINE = re.compile(r"`((?:dvae|dvc|torchrun|pip install|python -m dvae_cli)(?: [^`]*)?|python benchmarks/[^`]+)`")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")
"""COMMAND, PATH, MODEL_PT: a word the reader replaces."""


def command_lines(text: str) -> list[tuple[list[str], bool]]:
    """(words, whole) of each command of the page: those of ```bash blocks (continuations joined, comments dropped)
    are whole command lines, those of inline code spans in the prose may be fragments (`dvae train`); split at
    `&&`, `|` and `;`."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append((re.split(r"\s+#\s", line, maxsplit=1)[0], True))
    lines += [(span, False) for span in INLINE.findall(re.sub(r"```.*?```", "", text, flags=re.S))]
    commands = []
    for line, whole in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token not in (";", "&&", "|", "||"):
                words.append(token)
                continue
            words = words[1:] if words[:1] == ["xargs"] else words
            if words and words[0] in PROGRAMS:
                commands.append((words, whole))
            words = []
    return commands


COMMANDS = [(page.relative_to(PROJECT).as_posix(), words, whole) for page in PAGES
            for words, whole in command_lines(page.read_text())]


def dvae_words(words: list[str]) -> list[str] | None:
    """The `dvae` arguments of a line that runs dvae (directly, `python -m dvae_cli`, torchrun -m dvae_cli)."""
    if words[0] == "dvae":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1:][:1] == ["dvae_cli"]:
        return words[words.index("-m") + 2:]
    return None


def parse_dvae(arguments: list[str], whole: bool = True) -> None:
    """A whole line must parse as it is; a fragment must name a command and only options it has."""
    group = typer.main.get_command(app)
    name, rest = ("dvae", arguments) if not arguments or arguments[0].startswith("-") else (arguments[0], arguments[1:])
    if PLACEHOLDER.match(name):
        return
    command = group if name == "dvae" else group.commands.get(name)
    assert command is not None, f"no command {name}"
    if not whole:
        options = {"--help", "-h", *(option for parameter in command.params
                                     for option in (*parameter.opts, *parameter.secondary_opts))}
        assert {word.split("=")[0] for word in rest if word.startswith("-")} <= options, rest
        return
    try:
        command.make_context(name, list(rest))
    except Exception as error:
        if type(error).__name__ != "Exit":  # what --help and --version end with
            raise
        assert error.exit_code == 0


class Parsed(Exception):
    """Raised once a benchmark's parser has taken the line, so that nothing runs."""


def parse_benchmark(script: str, arguments: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    original = argparse.ArgumentParser.parse_args

    def parse_only(parser, args=None, namespace=None):
        original(parser, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [script, *arguments])
    with benchmark_module(Path(script).stem) as module, pytest.raises(Parsed):
        module.main()


def test_the_pages_show_commands_of_every_kind() -> None:
    kinds = {words[0] if dvae_words(words) is None else "dvae" for _, words, _ in COMMANDS}
    assert {"dvae", "dvc", "python", "pip"} <= kinds
    assert sum(dvae_words(words) is not None and whole for _, words, whole in COMMANDS) > 30


@pytest.mark.parametrize(("page", "words", "whole"), COMMANDS,
                         ids=[f"{page}: {' '.join(words)[:70]}" for page, words, _ in COMMANDS])
def test_every_command_line_parses(page: str, words: list[str], whole: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    arguments = dvae_words(words)
    if arguments is not None:
        parse_dvae(arguments, whole)
    elif words[0] == "dvc" and whole:
        from dvc.cli import parse_args

        parse_args(words[1:])
    elif words[0] == "python" and words[1].startswith("benchmarks/"):
        parse_benchmark(words[1], words[2:], monkeypatch)
    elif words[:2] == ["pip", "install"]:
        extras = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for word in words[2:]:
            for named in re.findall(r"\[([\w,-]+)\]", word):
                assert set(named.split(",")) <= set(extras), word


def test_a_wrong_option_is_caught() -> None:
    """The check itself: an option the command lacks, or a value of the wrong type, fails to parse."""
    with pytest.raises(Exception, match="No such option: --epoch"):
        parse_dvae(["train", "--model", "vqvae", "--epoch", "3"])
    with pytest.raises(Exception, match="valid integer"):
        parse_dvae(["train", "--model", "vqvae", "--epochs", "three"])
    with pytest.raises(AssertionError):
        parse_dvae(["train", "--epoch"], whole=False)
