"""Reading suite files without trusting them. Whatever a broken or hostile YAML file pushes against
(its size, its encoding, its nesting, aliases expanding into aliases, a key given twice) ends in
one line naming the file, never a traceback, a hang or a silently dropped key.

`read(path)` follows `include:` (paths relative to the including file; the including file's keys
are deep-merged over its includes') and records which file set each key, so that a problem names
the file holding the mistake rather than the file that included it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.events import MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from benchkit.errors import BadInput

MAX_FILE_BYTES = 1 << 20        # one suite file (the largest shipped suite is about 10 KiB)
MAX_TOTAL_BYTES = 4 << 20       # a suite and every file it includes
MAX_INCLUDES = 100              # include: entries followed, over all files
MAX_DEPTH = 32                  # mappings and lists nested in each other
MAX_VALUES = 100_000            # values of a file once YAML aliases are expanded

MERGE_TAG = "tag:yaml.org,2002:merge"


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def origin(origins: dict[tuple, str], loc: tuple | list, default: str) -> str:
    """The file that set the value at `loc`: the deepest key path an include merge recorded."""
    loc = tuple(loc)
    for n in range(len(loc), 0, -1):
        if (found := origins.get(loc[:n])) is not None:
            return found
    return default


@dataclass
class SuiteFile:
    """A suite file with its includes merged."""
    path: Path                  # as the user named it
    data: dict
    # Key path (through mappings only: a list comes whole from one file) -> the file that set it.
    origins: dict[tuple, str] = field(default_factory=dict)
    # Problems that leave the data usable (a duplicate key), reported with the schema's.
    problems: list[str] = field(default_factory=list)

    def source(self, loc: tuple | list) -> str:
        return origin(self.origins, loc, str(self.path))


# ---------------------------------------------------------------- one YAML document

class _TooDeep(yaml.MarkedYAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that bounds nesting while composing (PyYAML's composer recurses per level) and
    records every key a mapping gives twice (YAML says keys are unique; PyYAML keeps the last)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._checked: set[int] = set()
        self.duplicates: list[tuple[int, str]] = []   # (line, problem)

    def compose_node(self, parent, index):
        collection = self.check_event(MappingStartEvent, SequenceStartEvent)
        if collection:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _TooDeep(problem=f"nested deeper than {MAX_DEPTH} levels of mappings and lists",
                               problem_mark=self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if collection:
                self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            self._find_duplicates(node)   # before flatten_mapping adds the keys of `<<` merges
        return super().construct_mapping(node, deep=deep)

    def _find_duplicates(self, node: MappingNode) -> None:
        # A node reached again through an alias is checked once (an alias bomb stays linear).
        if id(node) in self._checked:
            return
        self._checked.add(id(node))
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:   # `<<: *base` may be overridden by the mapping's own keys
                merged = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for sub in merged:
                    if isinstance(sub, MappingNode):
                        self._find_duplicates(sub)
                continue
            if not isinstance(key_node, ScalarNode):
                continue   # complex keys: PyYAML's own checks apply
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    shown = f"'{key}'" if isinstance(key, str) else repr(key)
                    self.duplicates.append((line, f"line {line}: duplicate key {shown} (first at line {first[key]})"))
                else:
                    first[key] = line
            except TypeError:   # unhashable: PyYAML says so when it builds the mapping
                continue

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:   # more digits than Python converts (sys.get_int_max_str_digits)
            raise yaml.constructor.ConstructorError(
                problem=f"an integer of {len(node.value)} digits is too large", problem_mark=node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def parse(text: str, name: str) -> tuple[Any, list[str]]:
    """One YAML document -> (data, duplicate-key problems); BadInput (one line) when it is not YAML
    or nests too deep."""
    loader = None
    try:
        loader = _Loader(text)   # its reader refuses some characters (NUL, C1 controls) right here
        data = loader.get_single_data()
        # A mapping's keys are checked before its values are built: sort by line.
        return data, [f"{name}: {d}" for _, d in sorted(loader.duplicates, key=lambda d: d[0])]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        if isinstance(exc, yaml.reader.ReaderError):   # a character YAML refuses (NUL, C1 controls)
            start = text.rfind("\n", 0, exc.position) + 1
            line = text.count("\n", 0, exc.position) + 1
            pos = f"line {line}, column {exc.position - start + 1}: "
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        kind = "" if isinstance(exc, _TooDeep) else "malformed YAML: "
        raise BadInput(f"{name}: {pos}{kind}{problem}") from None
    except RecursionError:   # a limit missed above: still one line
        raise BadInput(f"{name}: nested too deep (at most {MAX_DEPTH} levels of mappings and lists)") from None
    finally:
        if loader is not None:
            loader.dispose()


def expansion_problem(data: Any) -> str | None:
    """Why `data` is too big once aliases are expanded (values or depth), or None. The walk stops
    at the first limit, so a "billion laughs" file costs MAX_VALUES steps, not a billion; it is
    iterative, so a self-referencing alias (`&a [*a]`) ends at the depth limit."""
    count, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return f"the suite expands to more than {MAX_VALUES} values (YAML aliases nested in aliases?)"
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, (list, tuple, set, frozenset)):   # !!pairs and !!omap build tuples
            children = value
        else:
            continue
        if level > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels of mappings and lists (through YAML aliases?)"
        stack.extend((child, level + 1) for child in children)
    return None


def _size(n: int) -> str:
    """Bytes as a person reads them: '100.0 MiB', '1 MiB', '1048577 bytes' (just over a limit)."""
    if n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    return f"{n / (1 << 20):.1f} MiB" if n >= 10 << 20 else f"{n} bytes"


# ---------------------------------------------------------------- a suite and its includes

def _key_paths(data: dict, name: str) -> dict[tuple, str]:
    out, stack = {}, [((), data)]
    while stack:
        prefix, d = stack.pop()
        for k, v in d.items():
            out[(*prefix, k)] = name
            if isinstance(v, dict):
                stack.append(((*prefix, k), v))
    return out


def _has_path(data: Any, path: tuple) -> bool:
    for k in path:
        if not isinstance(data, dict) or k not in data:
            return False
        data = data[k]
    return True


def _merge(base: dict, base_origins: dict, over: dict, over_origins: dict) -> tuple[dict, dict]:
    merged = deep_merge(base, over)
    # A key of `base` under one that `over` replaced (by a non-mapping) is gone: so is its origin.
    origins = {p: f for p, f in {**base_origins, **over_origins}.items() if _has_path(merged, p)}
    return merged, origins


class _Reader:
    def __init__(self, top: Path, shown: str):
        self.top, self.shown = top, shown
        self.total = 0
        self.includes = 0
        self.done: dict[Path, tuple[dict, dict]] = {}   # a file included twice is read once
        self.problems: list[str] = []

    def name(self, path: Path) -> str:
        return self.shown if path == self.top else str(path)

    def _text(self, path: Path) -> str:
        name = self.name(path)
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise BadInput(f"{name}: {_size(size)}; a suite file is at most {_size(MAX_FILE_BYTES)}")
            with path.open("rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)   # not trusting stat: the file may grow meanwhile
        except OSError as exc:
            raise BadInput(f"{name}: cannot be read: {exc.strerror or exc}") from None
        if len(raw) > MAX_FILE_BYTES:
            raise BadInput(f"{name}: over {_size(MAX_FILE_BYTES)}; a suite file is at most {_size(MAX_FILE_BYTES)}")
        self.total += len(raw)
        if self.total > MAX_TOTAL_BYTES:
            raise BadInput(f"{name}: the suite and its includes come to {_size(self.total)} with this file; "
                           f"they are at most {_size(MAX_TOTAL_BYTES)} in all")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            start = raw.rfind(b"\n", 0, exc.start) + 1
            line = raw.count(b"\n", 0, exc.start) + 1
            column = len(raw[start:exc.start].decode("utf-8")) + 1
            raise BadInput(f"{name}: line {line}, column {column}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                           "save the file as UTF-8") from None

    def read(self, path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict]:
        if path in self.done:
            return self.done[path]
        where = self.name(chain[-1]) if chain else None
        if path in chain:
            cycle = " -> ".join(self.name(p) for p in (*chain, path))
            raise BadInput(f"{where}: include: include cycle {cycle}")
        if not path.is_file():
            raise BadInput(f"{where}: include: file not found: {path}" if where else f"{path}: file not found")
        name = self.name(path)
        data, duplicates = parse(self._text(path), name)
        self.problems += duplicates
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise BadInput([*duplicates, f"{name}: the top level must be a mapping, not {type(data).__name__}"])
        if why := expansion_problem(data):   # before anything walks it: merge, schema, hash, JSON
            raise BadInput(f"{name}: {why}")
        includes = data.get("include", [])
        if isinstance(includes, str):
            includes = [includes]
        if not isinstance(includes, list):
            raise BadInput(f"{name}: include: must be a list of paths")
        if bad := [i for i, inc in enumerate(includes) if not isinstance(inc, str)]:
            raise BadInput(f"{name}: include[{bad[0]}]: must be a path (a string)")
        self.includes += len(includes)
        if self.includes > MAX_INCLUDES:
            raise BadInput(f"{name}: include: more than {MAX_INCLUDES} includes in all")
        merged: dict = {}
        origins: dict[tuple, str] = {}
        for inc in includes:
            sub, sub_origins = self.read((path.parent / inc).resolve(), (*chain, path))
            merged, origins = _merge(merged, origins, sub, sub_origins)
        own = {k: v for k, v in data.items() if k != "include"}
        merged, origins = _merge(merged, origins, own, _key_paths(own, name))
        merged["include"] = list(includes)
        origins[("include",)] = name
        if why := expansion_problem(merged):   # many includes, each under the limit
            raise BadInput(f"{name}: {why}")
        self.done[path] = (merged, origins)
        return merged, origins


def read(path: Path) -> SuiteFile:
    """The suite at `path` (an existing file) with its includes merged; BadInput when it cannot be
    read as a suite at all. Duplicate keys are kept in `problems` (the last one wins meanwhile)."""
    reader = _Reader(path.resolve(), str(path))
    data, origins = reader.read(path.resolve(), ())
    return SuiteFile(path, data, origins, reader.problems)
