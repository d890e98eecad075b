"""Validation of names a user types: labels, dataset and run names.

Names become safe slugs: lower-case ASCII letters, digits and single dashes, so
that nothing a user types can reach a path outside the store.
"""
from __future__ import annotations

import re
import unicodedata

_SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,78}[a-z0-9])?$")


def slugify(text: str) -> str:
    """'Chesapeake Bay Retriever' -> 'chesapeake-bay-retriever'."""
    norm = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", norm.lower()).strip("-")
    return slug[:80].strip("-")


def checked_slug(value: str, what: str) -> str:
    """Return `value` if it already is a safe slug, else raise ValueError naming `what`."""
    if not isinstance(value, str) or not _SLUG_RE.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid name: use 1-80 lower-case letters, digits "
            f"and dashes, starting and ending with a letter or digit (e.g. {slugify(str(value)) or 'dogs-v1'!r})"
        )
    return value
