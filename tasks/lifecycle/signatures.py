"""SSH signatures, the scheme git uses for signed commits: ``ssh-keygen -Y sign | verify | find-principals``.

    sign(data, key, namespace)                          → an armored ``SSH SIGNATURE``
    verify(data, signature, signers, principal, ns)     → None when it verifies, else why not
    principals_of_key(key, signers)                     → who ``signers`` says a private key belongs to

``signers`` is an *allowed_signers* file (``man ssh-keygen``, ALLOWED SIGNERS): one line per person,
``PRINCIPAL[,PRINCIPAL...] [namespaces="kiln-approval,..."] KEYTYPE BASE64KEY``. A signature verifies only
for a principal listed with that key, in that namespace, within the line's validity window. Verification is
offline: nothing but the file, the data and the signature. Signing with a ``.pub`` path uses the matching
key in ``ssh-agent``; a passphrase-protected key asks for its passphrase on the terminal.

ssh-keygen runs as a subprocess with a timeout, its inputs in a private temporary folder (mode 0700,
files 0600); a missing ssh-keygen, key or signers file is a :class:`SignatureError` saying what to do.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln.errors import KilnError

APPROVALS = "kiln-approval"  # decisions and rollout commands: what approvers sign
REQUESTS = "kiln-request"  # requests for work (`kiln optimize --sign`): who asked, for four-eyes review
SIGN_TIMEOUT_S = 120.0  # signing may wait for a person typing a key's passphrase
VERIFY_TIMEOUT_S = 15.0


class SignatureError(KilnError):
    """A key, an allowed_signers file or ssh-keygen itself is missing or unusable (exit status 2)."""


def ssh_keygen() -> str:
    """The ssh-keygen executable, or :class:`SignatureError` saying how to install it."""
    found = shutil.which("ssh-keygen")
    if found is None:
        raise SignatureError("ssh-keygen is not installed, and Kiln signs and verifies decisions with it; "
                             "install OpenSSH's client (Debian/Ubuntu: apt-get install openssh-client)")
    return found


@contextmanager
def _private_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kiln-sig-") as tmp:  # created 0700
        yield Path(tmp)


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _run(args: list[str], *, data: bytes | None = None,
         timeout: float = VERIFY_TIMEOUT_S) -> subprocess.CompletedProcess:
    feed = {"input": data} if data is not None else {"stdin": subprocess.DEVNULL}
    try:
        return subprocess.run([ssh_keygen(), *args], capture_output=True, timeout=timeout, check=False, **feed)
    except subprocess.TimeoutExpired as exc:
        raise SignatureError(f"ssh-keygen {args[0]} {args[1]} took longer than {timeout:g} s; "
                             "is it waiting for a passphrase?") from exc


def _message(proc: subprocess.CompletedProcess) -> str:
    text = ((proc.stderr or b"") + b"\n" + (proc.stdout or b"")).decode(errors="replace").strip()
    lines = [line for line in text.splitlines() if line and not line.startswith("Signing data on standard input")]
    return "; ".join(lines)[:300] or f"exit status {proc.returncode}"


def _key_file(key: Path) -> Path:
    if not key.is_file():
        raise SignatureError(f"signing key {key} does not exist; set KILN_SIGNING_KEY (or --key) to your SSH "
                             "private key, or to its .pub with the key loaded in ssh-agent")
    return key


def signers_file(path: Path) -> Path:
    """``path`` when it is a readable file, else :class:`SignatureError` saying how to create it."""
    if not path.is_file():
        raise SignatureError(f"no approvers' keys: {path} does not exist. Create it with one line per approver, "
                             "`PRINCIPAL KEYTYPE PUBLICKEY` (e.g. `alice ssh-ed25519 AAAA...`), or point "
                             "KILN_ALLOWED_SIGNERS at yours; until then no decision can be verified")
    return path


def sign(data: bytes, key: Path, namespace: str) -> str:
    """Sign ``data`` with ``key`` in ``namespace``; returns the armored signature."""
    proc = _run(["-Y", "sign", "-n", namespace, "-f", str(_key_file(key))], data=data, timeout=SIGN_TIMEOUT_S)
    signature = proc.stdout.decode(errors="replace")
    if proc.returncode != 0 or "BEGIN SSH SIGNATURE" not in signature:
        raise SignatureError(f"ssh-keygen could not sign with {key}: {_message(proc)}")
    return signature


def verify(data: bytes, signature: str, signers: Path, principal: str, namespace: str) -> str | None:
    """None when ``signature`` is ``principal``'s over ``data`` in ``namespace`` by a key ``signers`` lists for
    them; otherwise the reason it is not (ssh-keygen's words). Results are remembered per signers-file state."""
    stat = signers_file(signers).stat()
    return _verify(data, signature, str(signers), stat.st_mtime_ns, stat.st_size, principal, namespace)


@functools.lru_cache(maxsize=512)
def _verify(data: bytes, signature: str, signers: str, _mtime: int, _size: int, principal: str,
            namespace: str) -> str | None:
    if not principal or principal.startswith("-") or any(c.isspace() for c in principal):
        return f"{principal!r} is not a principal"
    with _private_dir() as tmp:
        sig = _write_private(tmp / "data.sig", signature.encode())
        proc = _run(["-Y", "verify", "-f", signers, "-I", principal, "-n", namespace, "-s", str(sig)], data=data)
    return None if proc.returncode == 0 else _message(proc)


def principals_of_key(key: Path, signers: Path) -> list[str]:
    """The principals ``signers`` lists for ``key``'s public half ([] when it lists none). Not proof of
    anything by itself: :func:`verify` is what checks a signature."""
    signers_file(signers)
    public = key if key.suffix == ".pub" else Path(f"{key}.pub")
    if public.is_file():  # read, not signed: a key with a passphrase asks for it once, when it signs
        parts = public.read_text().split()
        if len(parts) >= 2:
            return _listed(" ".join(parts[:2]), signers)
    with _private_dir() as tmp:
        sig = _write_private(tmp / "probe.sig", sign(b"kiln: whose key is this?", key, "kiln-probe").encode())
        proc = _run(["-Y", "find-principals", "-s", str(sig), "-f", str(signers)])
    if proc.returncode != 0:
        return []
    return [line.strip() for line in proc.stdout.decode(errors="replace").splitlines() if line.strip()]


def _listed(public: str, signers: Path) -> list[str]:
    """Principals of the lines of ``signers`` that hold the key ``public`` (``KEYTYPE BASE64``)."""
    keytype, blob = public.split()
    found: list[str] = []
    for line in signers.read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and any(
                a == keytype and b == blob for a, b in zip(fields[1:], fields[2:], strict=False)):
            found += [p for p in fields[0].split(",") if p and p not in found]
    return found


def make_key(path: Path, comment: str) -> Path:
    """A new ed25519 key without a passphrase at ``path`` (and ``path.pub``), for the demo and for tests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = _run(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    if proc.returncode != 0:
        raise SignatureError(f"ssh-keygen could not make a key at {path}: {_message(proc)}")
    return path


def signer_line(principal: str, key: Path, namespaces: tuple[str, ...] = ()) -> str:
    """The allowed_signers line for ``principal`` and ``key``'s public half (``key.pub``)."""
    public = Path(f"{key}.pub") if not str(key).endswith(".pub") else key
    keytype, blob = public.read_text().split()[:2]
    option = f' namespaces="{",".join(namespaces)}"' if namespaces else ""
    return f"{principal}{option} {keytype} {blob}"
