"""Variables in a pipeline file's strings, expanded when it loads (before validation, so a
value's type is checked after expansion):

- ``${PIPELINE_DIR}``: the absolute path of the file's folder;
- ``${PYTHON}``: the Python that runs pilot-agents (for services written in Python);
- ``${PORT:NAME}``: a free TCP port on this machine, the same one everywhere in the file and in
  every process of one run (``$PIPELINE_PORT_NAME`` gives it instead: ``run`` passes the ports it
  chose to its agents' processes that way, and a deployment over several machines sets it);
- ``${NAME}``: the environment variable NAME (an error if unset), ``${NAME:-DEFAULT}`` with a
  default (itself expanded);
- ``$$`` is a ``$``.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FieldValueError

VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PORT_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
PORT_ENV_PREFIX = "PIPELINE_PORT_"


def port_env(name: str) -> str:
    """The environment variable that fixes ``${PORT:name}``."""
    return PORT_ENV_PREFIX + name.upper()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick; it could be taken before its user binds
    it, which on one machine in one run does not happen in practice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Expander:
    """Expands the variables of one file; ``ports`` collects the ``${PORT:NAME}`` it gave."""

    folder: Path
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    ports: dict[str, int] = field(default_factory=dict)
    pick_port: Callable[[], int] = free_port

    def port(self, name: str) -> int:
        if not PORT_NAME.match(name):
            raise ValueError(f"${{PORT:{name}}}: a port's name is lowercase letters, digits and "
                             "'_' (up to 32)")
        if name not in self.ports:
            given = self.environ.get(port_env(name))
            if given is None:
                self.ports[name] = self.pick_port()
            elif given.isdigit() and 1 <= int(given) <= 65535:
                self.ports[name] = int(given)
            else:
                raise ValueError(f"${port_env(name)} is {given!r}, not a port number")
        return self.ports[name]

    def variable(self, body: str) -> str:
        """The value of ``${BODY}``."""
        if body.startswith("PORT:"):
            return str(self.port(body[5:]))
        name, sep, default = body.partition(":-")
        if not VARIABLE.fullmatch(name):
            raise ValueError(f"${{{body}}} is not a variable (${{NAME}}, ${{NAME:-DEFAULT}}, "
                             "${PORT:NAME}, ${PIPELINE_DIR}, ${PYTHON})")
        if name == "PIPELINE_DIR":
            return str(self.folder)
        if name == "PYTHON":
            return sys.executable
        if name in self.environ:
            return self.environ[name]
        if sep:
            return self.string(default)
        raise ValueError(f"${{{name}}}: the environment variable {name} is not set (give a "
                         f"default with ${{{name}:-DEFAULT}})")

    def string(self, text: str) -> str:
        out: list[str] = []
        i = 0
        while (j := text.find("$", i)) >= 0:
            out.append(text[i:j])
            if text.startswith("$$", j):
                out.append("$")
                i = j + 2
                continue
            if not text.startswith("${", j):
                out.append("$")
                i = j + 1
                continue
            end, depth = j + 2, 1  # the matching brace: a default may hold ${...} itself
            while end < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            if depth:
                raise ValueError(f"{text[j:]!r}: an unclosed '${{'")
            out.append(self.variable(text[j + 2:end - 1]))
            i = end
        out.append(text[i:])
        return "".join(out)

    def value(self, value: Any, errors: list[FieldValueError],
              path: tuple[str | int, ...] = ()) -> Any:
        """``value`` (the loaded YAML) with every string expanded. A string that does not
        expand is left as written and its error, a :class:`FieldValueError` naming its path,
        added to ``errors``: the file's other problems are found and reported with it."""
        if isinstance(value, dict):
            return {k: self.value(v, errors, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, errors, (*path, i)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "$" not in value:
            return value
        try:
            return self.string(value)
        except ValueError as exc:
            errors.append(FieldValueError(path, str(exc)))
            return value
