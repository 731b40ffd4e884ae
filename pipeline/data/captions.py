"""Caption cleaning as UMT / VideoMamba apply it to every caption before tokenising (their `pre_text`).

Lower-case; delete the characters , . ' ! ? " ( ) * # : ; ~; turn '-' and '/' into spaces and '<person>'
into 'person'; collapse runs of whitespace into one space; strip the ends. Optionally keep the first
`max_words` words.
"""

from __future__ import annotations

import re

_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def clean_caption(text: str, max_words: int | None = None) -> str:
    """The released caption cleaning (see the module docstring); `max_words` truncates to that many words."""
    text = _DELETED.sub("", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _WHITESPACE_RUN.sub(" ", text).rstrip("\n").strip(" ")
    if max_words:
        words = text.split(" ")
        text = " ".join(words[:max_words])
    return text
