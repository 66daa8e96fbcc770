"""Planted drift for demos, benchmarks and tests: the same texts' shapes, another domain's words.

:func:`another_domain` rewrites each text word for word from the words of Python's standard-library docstrings
(software documentation: another domain than tweets, PSF-licensed, shipped with every Python), each word cut to
the original's length, so every text keeps exactly its characters and words. The rollout's length checks cannot
see the change; checks that read content (tokens, embeddings) must.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import re
from collections.abc import Iterator, Sequence


def _words() -> Iterator[str]:
    doc = " ".join(m.__doc__ or "" for m in (collections, json, functools, itertools, re))
    return itertools.cycle(w.lower() for w in re.findall(r"[A-Za-z]{3,}", doc))


def another_domain(texts: Sequence[str]) -> list[str]:
    """Each of ``texts`` with every word replaced by documentation words of the same length. Deterministic."""
    stream = _words()

    def word(n: int) -> str:
        out = ""
        while len(out) < n:
            out += next(stream)
        return out[:n]

    return [re.sub(r"\S+", lambda m: word(len(m.group())), t) for t in texts]
