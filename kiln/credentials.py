"""Credentials inside URLs: shown as ``***``, kept out of what is recorded, handed over out of sight.

A database URL (``postgresql://kiln:PASSWORD@db/kiln``) or a repository URL
(``https://ci:TOKEN@git.example.com/acme/models.git``) carries a secret in its user-info part. Kiln puts
such a URL on no command line, log line, pid file, MLflow tag or Prefect run parameter: what is shown goes
through :func:`redact` (or :func:`redact_text` for a line that may hold URLs), what is recorded through
:func:`split_credentials`, and the process that needs the secret gets it in its environment.

Imports nothing of Kiln: settings, stage logic and servers all use it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# http(s) URLs take a token as the user name alone (https://TOKEN@github.com/...): any user info is a secret there.
_USER_IS_SECRET = ("http", "https")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")


def _userinfo(url: str) -> tuple[str, str, str | None, str] | None:
    """(scheme, user, password or None, host part) of ``url`` when it has user info; None otherwise."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: no URL Kiln could use
        return None
    if not parts.scheme or "@" not in parts.netloc:
        return None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    return parts.scheme.lower(), user, password if sep else None, host


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for what is shown or logged.

    ``postgresql://kiln:s3cret@db:5432/kiln`` → ``postgresql://kiln:***@db:5432/kiln``. An http(s) URL with a
    user name alone has the name replaced (``https://***@github.com/acme/models.git``): GitHub takes a token
    there. Anything else — a path, ``git@host:org/repo``, ``ssh://git@host/repo``, a URL without user info —
    comes back as it is.
    """
    found = _userinfo(url)
    if found is None:
        return url
    scheme, user, password, host = found
    if password is not None:
        userinfo = f"{user}:{MASK}"
    elif scheme in _USER_IS_SECRET and user:
        userinfo = MASK
    else:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def redact_text(text: str) -> str:
    """``text`` (a log line, a command line, an error message) with every URL in it passed through :func:`redact`."""
    return _URL.sub(lambda match: redact(match.group()), text)


def split_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without its credentials, and those credentials (``USER:PASSWORD``, percent-decoded).

    ``https://ci:t%40ken@git.example.com/x.git`` → (``https://git.example.com/x.git``, ``ci:t@ken``);
    ``https://TOKEN@github.com/x`` → (``https://github.com/x``, ``TOKEN:``). Only URLs whose user info is a
    secret are split (see :func:`redact`); others come back as (``url``, None).
    """
    if redact(url) == url:
        return url, None
    scheme, user, password, host = _userinfo(url)  # type: ignore[misc] - redact changed it: it has user info
    return urlunsplit(urlsplit(url)._replace(netloc=host)), f"{unquote(user)}:{unquote(password or '')}"


def same_origin(url: str, other: str) -> bool:
    """True when both URLs name the same scheme, host and port: where a credential for one may also go."""
    try:
        a, b = urlsplit(url), urlsplit(other)
        return bool(a.scheme) and (a.scheme.lower(), a.hostname, a.port) == (b.scheme.lower(), b.hostname, b.port)
    except ValueError:
        return False
