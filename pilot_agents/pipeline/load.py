"""Reading a pipeline file: YAML (PyYAML, which keeps every node's line) validated by
:mod:`.schema`, every error turned into ``FILE:LINE: FIELD.PATH: what is wrong``."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import FieldValueError, FieldValueErrors, PipelineError
from .schema import DOTTED, HOST_PORT, NAME, STEP_ID, STEP_KINDS, Pipeline
from .variables import Expander, port_env

MAX_FILE_BYTES = 1 << 20  # a pipeline file is a description, not data
# Levels of nesting: PyYAML, the checks and the expansion of variables all recurse into a
# value, and Python's stack is not the bound a user should meet (as an internal error).
MAX_DEPTH = 100
# Values the aliases of a file may add to it, in all: each alias stands for a copy of the value
# it names, so a few hundred bytes of aliases of aliases ("billion laughs") would expand to
# billions of values, each walk of the file taking memory and time in proportion.
MAX_ALIAS_VALUES = 100_000


PATTERNS = {
    NAME: "a hostname label (lowercase letters, digits and inner '-', up to 63 characters)",
    STEP_ID: "a step id (a letter or '_', then letters, digits, '_' or '-')",
    DOTTED: "a module and an attribute of it (package.module:attribute or module.attribute)",
    HOST_PORT: "HOST:PORT",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the file."""

    file: str
    line: int  # 1-based
    field: str  # dotted path, "" for the file itself
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.file}:{self.line}: {where}{self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field,
                "message": self.message}


class InvalidPipeline(PipelineError):
    """The file does not parse or validate; ``problems`` lists every error."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = list(problems)


@dataclass(frozen=True)
class LoadedPipeline:
    path: Path  # absolute; the python steps' modules and relative paths are found from its folder
    spec: Pipeline
    ports: dict[str, int] = field(default_factory=dict)  # the ${PORT:NAME} it was given

    def port_environ(self) -> dict[str, str]:
        """The environment that gives another process of this run the same ports."""
        return {port_env(name): str(port) for name, port in self.ports.items()}

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return self.spec.name or self.path.stem


class _Refused(Exception):
    """Valid YAML that this loader does not expand, at the line of ``event``."""

    def __init__(self, event: yaml.Event, message: str) -> None:
        super().__init__(message)
        self.line = event.start_mark.line + 1 if event.start_mark else 1


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what would take it without bound: an alias inside the
    value it names (a recursive structure, which every walk of the file would follow for
    ever), aliases that expand to more than MAX_ALIAS_VALUES values, and nesting deeper than
    MAX_DEPTH."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        # id() of each node composed to its end -> the values it stands for and how deep they
        # nest, its aliases expanded: an alias adds those of the value it names, known
        # without expanding it.
        self.extents: dict[int, tuple[int, int]] = {}
        self.aliased = 0  # values the aliases composed so far add to the file
        self.depth = 0  # of the node being composed, as written (PyYAML's own recursion)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self.check_event()  # the next event, in current_event (peek_event is untyped)
        event: yaml.Event = self.current_event
        if isinstance(event, yaml.AliasEvent):
            named = self.anchors.get(event.anchor)
            if named is not None:
                if id(named) not in self.extents:
                    raise _Refused(event, f"recursive alias *{event.anchor}: it is "
                                   "inside the value it names, which would never end")
                self.aliased += self.extents[id(named)][0]
                if self.aliased > MAX_ALIAS_VALUES:
                    raise _Refused(event, f"*{event.anchor}: with it the file's "
                                   f"aliases expand to more than {MAX_ALIAS_VALUES:,} values "
                                   "(each alias is a copy of the value it names), a pipeline "
                                   "file's limit")
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused(event, f"nested more than {MAX_DEPTH} levels deep")
        node = super().compose_node(parent, index)
        self.depth -= 1
        if isinstance(node, yaml.SequenceNode):
            inner: list[yaml.Node] = node.value
        elif isinstance(node, yaml.MappingNode):
            inner = [part for pair in node.value for part in pair]
        else:
            inner = []
        extents = [self.extents[id(part)] for part in inner]
        depth = 1 + max((d for _, d in extents), default=0)
        if depth > MAX_DEPTH:  # only through aliases: each of which may add its value's depth
            raise _Refused(event, f"nested more than {MAX_DEPTH} levels deep, with "
                           "the values its aliases name")
        self.extents[id(node)] = (1 + sum(size for size, _ in extents), depth)
        return node


class _Lines:
    """The line of each field of a composed YAML document, by its path."""

    def __init__(self, root: yaml.Node, file: str) -> None:
        self.root = root
        self.file = file
        self.duplicates: list[Problem] = []
        self._check(root, ())

    def _check(self, node: yaml.Node, path: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else str(key)
                if name in seen:
                    self.duplicates.append(Problem(
                        self.file, key.start_mark.line + 1, _dotted((*path, name)),
                        "given twice in one mapping (YAML keeps only the last)"))
                seen.add(name)
                self._check(value, (*path, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check(item, (*path, i))

    def problem(self, loc: Sequence[str | int], message: str) -> Problem:
        """``message`` about the field at ``loc``, placed where the file has it."""
        line, where = self.locate(loc)
        return Problem(self.file, line, _dotted(where), message)

    def locate(self, loc: Sequence[str | int]) -> tuple[int, tuple[str | int, ...]]:
        """The line of the deepest node of ``loc`` present in the file, and ``loc`` as the file
        spells it (pydantic's union tags and ``[key]`` markers dropped)."""
        node, line, path = self.root, self.root.start_mark.line + 1, []
        rest = list(loc)
        while rest:
            part = rest.pop(0)
            if part == "[key]" or (part in STEP_KINDS and rest[:1] == [part]):
                continue  # pydantic's marker of a key, or the tag of the step's union
            child = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                        child, line = value, key.start_mark.line + 1
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                    and part < len(node.value):
                child = node.value[part]
                line = child.start_mark.line + 1
            if child is None:
                path.append(part)
                path.extend(p for p in rest if p != "[key]")
                break
            node = child
            path.append(part)
        return line, tuple(path)


def _schema_problems(exc: ValidationError, lines: _Lines) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc: tuple[str | int, ...] = tuple(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        causes = cause.errors if isinstance(cause, FieldValueErrors) else [cause]
        for one in causes:
            if isinstance(one, FieldValueError):
                problems.append(lines.problem(loc + one.path, str(one)))
            else:
                problems.append(lines.problem(loc, _message(error)))
    return problems


def _dotted(path: Sequence[str | int]) -> str:
    return ".".join(str(p) for p in path)


def _message(error: Any) -> str:
    text = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        text = text.removeprefix(prefix)
    if error["type"] == "missing":
        return "required, and missing"
    if error["type"] == "extra_forbidden":
        return "not a known field (a typo?)"
    if error["type"] == "step_kind" and isinstance(error.get("input"), dict):
        return text + _step_keys_hint(error["input"])
    if error["type"] == "string_pattern_mismatch":
        pattern = (error.get("ctx") or {}).get("pattern")
        what = PATTERNS.get(str(pattern), f"of the form {pattern}")
        return f"{error['input']!r} is not {what}"
    return text


def _step_keys_hint(step: dict[Any, Any]) -> str:
    """What the step has instead, and the kind a misspelt key most likely meant."""
    kinds = [str(k) for k in step if k in STEP_KINDS]
    if kinds:
        return f"; it has {len(kinds)}: {', '.join(kinds)}"
    hints = [f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)
             for key in map(str, step)
             for close in [difflib.get_close_matches(key, STEP_KINDS, n=1)]]
    return f"; it has {', '.join(hints)}" if hints else "; it has none"


def parse(text: str, file: str, environ: Mapping[str, str] | None = None) -> LoadedPipeline:
    """Validate the pipeline ``text`` read from ``file``, its variables expanded from
    ``environ`` (default: this process's); InvalidPipeline lists what is wrong."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        data = None if root is None else loader.construct_document(root)
    except _Refused as exc:
        raise InvalidPipeline([Problem(file, exc.line, "", str(exc))]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise InvalidPipeline([Problem(file, line, "", f"not valid YAML: {exc.problem}")]) \
            from None
    except yaml.YAMLError as exc:
        raise InvalidPipeline([Problem(file, 1, "", f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    if root is None or not isinstance(data, dict):
        raise InvalidPipeline([Problem(file, 1, "", "a pipeline file is a mapping with at least "
                                       "'agents:'")])
    lines = _Lines(root, file)
    if lines.duplicates:
        raise InvalidPipeline(lines.duplicates)
    path = Path(file).resolve()
    expander = Expander(path.parent) if environ is None else Expander(path.parent, environ)
    unexpanded: list[FieldValueError] = []
    data = expander.value(data, unexpanded)
    problems = [lines.problem(one.path, str(one)) for one in unexpanded]
    # A string left as written is not what the file means: what the schema says of it (not a
    # port, not a hostname) would only repeat that its variable did not expand.
    unexpanded_fields = {problem.field for problem in problems}
    try:
        spec = Pipeline.model_validate(data)
    except ValidationError as exc:
        problems += [problem for problem in _schema_problems(exc, lines)
                     if not any(problem.field == f or problem.field.startswith(f"{f}.")
                                for f in unexpanded_fields)]
    if problems:
        raise InvalidPipeline(problems)
    return LoadedPipeline(path, spec, expander.ports)


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> LoadedPipeline:
    """Read and validate the pipeline file at ``path`` (variables from ``environ``, default
    this process's environment)."""
    file = Path(path)
    try:
        with file.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PipelineError(f"cannot read the pipeline {file}: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise PipelineError(f"{file} is larger than {MAX_FILE_BYTES} bytes; a pipeline file "
                            "describes agents (their data goes in other files)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{file} is not UTF-8 text (byte {exc.start})") from None
    return parse(text, str(file), environ)
