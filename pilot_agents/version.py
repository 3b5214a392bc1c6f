"""The package's version, defined once: in pyproject.toml, read from the installed metadata;
and its build, which tells one copy of its code from another."""

from __future__ import annotations

import functools
import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _installed_version() -> str:
    try:
        return version("pilot-agents")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _installed_version()


@functools.cache
def build() -> str:
    """What tells this copy of the package's code from another: a digest of its modules' paths,
    sizes and modification times. An upgrade, a reinstall or an edit changes it (the version
    does not move between releases), so a daemon still running the code from before can be
    told from the program talking to it. Computed once per process, by a stat per file: the
    daemon computes it as it starts, before the files can change under it."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".so", ".c") and "__pycache__" not in path.parts:
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                          .encode())
    return digest.hexdigest()[:16]
