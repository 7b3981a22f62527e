"""The click group of both command-line tools (``fbnet`` and ``fbnet-serve-cli``): a
:class:`~fbnet.errors.FbnetError` from any command becomes one line on stderr
(``Error: <message>``) and exit code 1, with no traceback. Nothing narrower is caught here: any
other exception is a bug and keeps its traceback. Torch-free (the serving CLI uses it)."""

from __future__ import annotations

import click

from .errors import FbnetError


class FbnetGroup(click.Group):
    """A :class:`click.Group` that shows an :class:`FbnetError` as click shows a usage error's
    message, minus the usage: one line, exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FbnetError as exc:
            raise click.ClickException(str(exc)) from None
