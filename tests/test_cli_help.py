"""``ccsr --help`` and every subcommand's help end with an example that the real parser accepts."""

from __future__ import annotations

import shlex

import pytest

from ccsr.cli import build_parser, main

COMMANDS = ["run", "daemon", "status", "generate", "eval", "report", "export", "validate"]


def help_text(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_every_subcommand_has_help():
    """The list below is the parser's: a new subcommand without an example fails here."""
    subparsers = build_parser()._subparsers._group_actions[0]
    assert sorted(subparsers.choices) == sorted(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_ends_with_an_example_the_parser_accepts(command, capsys):
    text = help_text([command] if command else [], capsys)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[-1].startswith("ccsr "), lines[-1]
    examples = [line for line in lines if line.startswith("ccsr ")]
    for example in examples:
        argv = shlex.split(example)[1:]
        args = build_parser().parse_args(argv)  # a usage error would exit 2
        assert args.command == (command or argv[0]), example
    if command:
        assert all(shlex.split(e)[1] == command for e in examples), examples


def test_the_validate_example_works_as_written(repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    example = help_text(["validate"], capsys).strip().splitlines()[-1]
    assert main(shlex.split(example)[1:]) == 0
    assert capsys.readouterr().out.strip() == "configs/tiny.yaml: ok"
