"""A griffe extension for the API reference: netgraft's docstrings use Sphinx roles
(``:func:`netgraft.fit```, ``:class:`~netgraft.Checkpoint```), which Markdown does not know;
this turns each into inline code (``~`` keeps the last name, as Sphinx does), before
mkdocstrings renders the docstring. It changes what the site shows, never the code."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _plain(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_plain, obj.docstring.value)
