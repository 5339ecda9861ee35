"""The title signal's text: a MovieLens title as it would be written, the input the title encoder embeds."""

from __future__ import annotations

import re

from genre_pipeline.data.catalog import parse_title_year

# Bump when normalise_title changes: vectors of differently normalised titles are not comparable.
NORMALISATION_VERSION = 1
# MovieLens writes "Matrix, The" and "Cité des enfants perdus, La": these trailing articles go back to the front.
ARTICLES = ("The", "A", "An", "La", "Le", "Les", "Il", "Das", "Der", "Die", "El", "L'")
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.+?),\s*(?P<article>" + "|".join(map(re.escape, ARTICLES)) + r")$")
_AKA = re.compile(r"\s*\(\s*a\.?k\.?a\.?\s[^()]*\)", re.IGNORECASE)  # "(a.k.a. Leon: The Professional)"
_ALIAS = re.compile(r"^(?P<main>.+?)\s*\((?P<alias>[^()]+)\)$")  # one trailing "(Le Confessionnal)"
_SPACES = re.compile(r"\s+")


def front_article(text: str) -> str:
    """'Matrix, The' -> 'The Matrix'; "Uomo delle stelle, L'" -> "L'Uomo delle stelle"."""
    match = _TRAILING_ARTICLE.match(text.strip())
    if match is None:
        return text.strip()
    article = match.group("article")
    return f"{article}{'' if article.endswith(chr(39)) else ' '}{match.group('body')}"


def normalise_title(text: str | None) -> str:
    """A MovieLens title as it would be written: no year, no a.k.a., articles in front (also in a trailing
    alternative title). '' for a null or blank title."""
    if text is None:
        return ""
    title, _ = parse_title_year(_SPACES.sub(" ", text))
    title = _AKA.sub("", title).strip()
    alias = _ALIAS.match(title)
    if alias is None:
        return front_article(title)
    return f"{front_article(alias.group('main'))} ({front_article(alias.group('alias'))})"
