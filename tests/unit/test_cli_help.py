"""Every command explains itself: a description for each subcommand, a help text for every option, and its default
in that text whenever it has one worth showing."""
from __future__ import annotations

import argparse
from typing import Iterator

from node.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, path: str = "lowband") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_command_has_a_description_and_every_option_a_help_with_its_default() -> None:
    missing = []
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 15  # the commands, the bench subcommands
    for path, parser in parsers:
        if not (parser.description or "").strip():
            missing.append(f"{path}: no description")
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings:
                continue
            name = "/".join(action.option_strings)
            if not (action.help or "").strip():
                missing.append(f"{path} {name}: no help")
                continue
            shown = formatter._get_help_string(action) % {"default": action.default, "prog": path}
            if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in shown:
                missing.append(f"{path} {name}: default {action.default!r} not shown")
    assert missing == []


def test_the_top_level_help_is_written_for_users_and_lists_exit_statuses() -> None:
    text = build_parser().format_help()
    assert text.splitlines()[2].startswith("lowband trains one PyTorch model")
    assert "lowband demo" in text and "exit status:" in text and "5    the coordinator stayed unreachable" in text
