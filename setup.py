"""Compiles the sans-IO protocol core with mypyc when it can; pyproject.toml has everything else.

The modules compiled are listed in pilot_agents/net/_native.py, with the C modules. The install
is pure Python (the same code, about half as fast per packet) when PILOT_PURE_PYTHON=1, when
mypyc cannot be imported, or when the C compiler fails.
"""

import os
import runpy
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

# By path: importing pilot_agents needs its dependencies, which a build environment lacks.
NATIVE = runpy.run_path(str(Path(__file__).resolve().parent / "pilot_agents/net/_native.py"))


class BuildExtOrPurePython(build_ext):
    """Builds the extensions on every core, and falls back to pure Python if that fails."""

    def finalize_options(self) -> None:
        if self.parallel is None:
            self.parallel = True  # one compiler per core: each module is a C file of its own
        super().finalize_options()

    def run(self) -> None:
        inplace = self.inplace
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError) as exc:
            self.inplace = inplace
            self.warn(f"cannot compile the protocol core ({exc}); installing pure Python")
            # Remove what did build: an extension without its __mypyc library fails to import.
            for ext in self.extensions:
                Path(self.build_lib, self.get_ext_filename(ext.name)).unlink(missing_ok=True)
            self.extensions = []
            return
        # An extension whose generated C did not change is not rebuilt, so it can be older than
        # its just-edited .py (a comment, say): mark it current for _native.stale().
        for ext in self.extensions:
            path = Path(self.get_ext_fullpath(ext.name))
            if path.exists():
                path.touch()


def ext_modules() -> list[Extension]:
    if os.environ.get("PILOT_PURE_PYTHON") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    # Errors only in the compiled modules: mypy also follows imports into the rest of the
    # package, whose dependencies (zmq, pydantic...) a build environment does not have.
    # No cache: mypyc 2.4's incremental rebuild can crash after a change to a module
    # (ValueError in emit_undefined_attr_check). Checking from scratch takes about 8 s.
    options = ["--follow-imports=silent", f"--cache-dir={os.devnull}"]
    try:
        # One C library for all of them: calls between the modules (session -> recovery,
        # streams, wire) are then direct C calls, not Python calls; measured ~1.5x less CPU per
        # packet than a library per module. That puts them in one import cycle for mypy, so the
        # wire.py constants other modules use carry explicit types (else "Cannot determine type"
        # depending on the order mypy checks the cycle in).
        # Named inside the package, so the library sits beside the modules (by default it is a
        # top-level module, importable only from the source root).
        core = mypycify(options + [f"pilot_agents/net/{NATIVE['source_path'](name)}"
                                   for name in NATIVE["COMPILED"]],
                        group_name="pilot_agents.net._core")
    except SystemExit:
        print("mypyc failed (above); PILOT_PURE_PYTHON=1 installs without compiling",
              file=sys.stderr)
        raise
    # Code mypyc compiles reaches C libraries only through Python calls (here ctypes), so the
    # AEAD call made for every packet has a small C module of its own; so have recvmmsg and
    # sendmmsg, which Python's socket module lacks (each module has a Python fallback).
    c_modules = [Extension(f"pilot_agents.net.{name}", [f"pilot_agents/net/{source}"])
                 for name, source in NATIVE["C_MODULES"].items()]
    return [*core, *c_modules]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExtOrPurePython})
