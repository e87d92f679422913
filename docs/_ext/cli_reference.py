"""
``.. pgbus-cli::``: the command line's reference, generated from ``pgbus._cli.build_parser``,
so it cannot drift from what ``pgbus --help`` says.
"""

from __future__ import annotations

import argparse
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from pgbus._cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


class CliReference(SphinxDirective):
    """One section per command: its ``--help``, verbatim."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        parser = build_parser("pgbus")
        result: list[nodes.Node] = [nodes.literal_block(text=parser.format_help().rstrip())]
        for name, command in _subcommands(parser).items():
            section = nodes.section(ids=[f"pgbus-{name}"])
            section += nodes.title(text=f"pgbus {name}")
            section += nodes.literal_block(text=command.format_help().rstrip())
            result.append(section)
        return result


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("pgbus-cli", CliReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
