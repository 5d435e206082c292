"""``katerchen --help`` and every command's help: complete (every option explained, every command
described, with its exit status) and what an operator needs to find there."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from katerchen import cli

# Every command line that has a help text of its own.
COMMANDS = [
    [],
    ["serve"],
    ["check-config"],
    ["passwd"],
    ["queue"],
    ["queue", "list"],
    ["queue", "show"],
    ["queue", "flush"],
    ["queue", "delete"],
    ["queue", "hold"],
    ["queue", "release"],
]


def parsers() -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    """(command words, parser) for the top level and every (sub)command."""
    stack: list[tuple[list[str], argparse.ArgumentParser]] = [([], cli.build_parser())]
    while stack:
        words, parser = stack.pop(0)
        yield words, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    stack.append(([*words, name], sub))


def help_text(words: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main([*words, "--help"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_every_command_has_a_help_test() -> None:
    assert sorted(words for words, _ in parsers()) == sorted(COMMANDS)


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "katerchen")
def test_help_is_complete(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = dict((tuple(w), p) for w, p in parsers())[tuple(words)]
    assert parser.description and len(parser.description) > 40
    out = help_text(words, capsys)
    assert out.startswith(f"usage: katerchen {' '.join(words)}".rstrip())
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"{choice.dest} has no summary"
                assert choice.dest in out
            continue
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        for option in action.option_strings:
            assert option in out
        if not action.option_strings:
            assert str(action.metavar) in out  # positional arguments are explained
    assert "KATERCHEN_CONFIG" in out  # where the config comes from, everywhere
    assert "exit status" in out.lower()  # and what the command returns


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_text([], capsys)
    for text in [
        "serve",
        "check-config",
        "passwd",
        "queue",
        "--config",
        "--log-level",
        "--log-format",
        "--pidfile",
        "--version",
        "SIGHUP",
        "SIGUSR1",
        "katerchen COMMAND --help",
        "127.0.0.1:2525",
    ]:
        assert text in out, text


def test_serve_help_covers_operations(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_text(["serve"], capsys)
    for text in [
        # signals
        "SIGTERM",
        "SIGINT",
        "SIGHUP",
        "SIGUSR1",
        "reload-failed",
        "shutdown_grace",
        # logs
        "--log-format",
        "json",
        "logfmt",
        "--log-level",
        "grep id=",
        "sid=",
        # init systems
        "NOTIFY_SOCKET",
        "READY=1",
        "STOPPING=1",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        '"submission"',
        '"submissions"',
        "--pidfile",
        "[server] pidfile",
        "[server] user",
        "[server] group",
        "scripts/",
    ]:
        assert text in out, text


def test_queue_help_lists_its_commands(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_text(["queue"], capsys)
    for command in ["list", "show", "flush", "delete", "hold", "release"]:
        assert f"\n    {command} " in out, command
    flush = help_text(["queue", "flush"], capsys)
    assert "--pidfile" in flush and "SIGUSR1" in flush


def test_help_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "katerchen", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: katerchen serve")
    assert "SIGHUP" in result.stdout
    assert result.stderr == ""
