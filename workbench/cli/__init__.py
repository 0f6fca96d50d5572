"""Command line: ``python -m workbench <command> --help`` (see ``main``)."""

from workbench.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
