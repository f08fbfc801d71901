"""Read YAML while remembering where every value came from (file and line).

Recipe errors must name the file, the line and the key, also for values a recipe
inherited through `extends:`; so each loaded document carries a map from key path to
(file, line), and merging two documents merges those maps too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import SqueezeError

KeyPath = tuple  # ("select", "rules", 0, "type")


@dataclass
class Located:
    """A plain YAML value plus the (file, line) of every key path inside it."""

    value: object
    where: dict[KeyPath, tuple[str, int]] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> tuple[str, int] | None:
        """The closest known location of `path`, walking up to its parents."""
        path = tuple(path)
        while True:
            if path in self.where:
                return self.where[path]
            if not path:
                return None
            path = path[:-1]


def dotted(path: KeyPath) -> str:
    """('select', 'rules', 0, 'type') -> 'select.rules[0].type'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isprintable() and part.strip() == part and part:
            out += f".{part}" if out else part
        else:  # a key a user could not see in a message (a newline, spaces at its ends, not a string)
            out += f"[{part!r}]"
    return out


def load_yaml(path: Path) -> Located:
    """Parse one YAML file into plain values and a location map; syntax errors name the line."""
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SqueezeError(f"{path}{line}: invalid YAML: {problem}") from None
    where: dict[KeyPath, tuple[str, int]] = {}
    if node is None:
        return Located({}, {(): (str(path), 1)})
    value = _to_python(node, (), str(path), where)
    return Located(value, where)


def _to_python(node, path: KeyPath, fname: str, where: dict) -> object:
    where[path] = (fname, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key in out:
                raise SqueezeError(f"{fname}:{key_node.start_mark.line + 1}: {dotted(path + (key,))}: "
                                   f"key given twice")
            where[path + (key,)] = (fname, key_node.start_mark.line + 1)
            out[key] = _to_python(value_node, path + (key,), fname, where)
            # The key's own line is the better pointer for scalars; keep it.
            if isinstance(value_node, yaml.ScalarNode):
                where[path + (key,)] = (fname, key_node.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, path + (i,), fname, where) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node) -> object:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def merge(base: Located, override: Located) -> Located:
    """`extends:` semantics: mappings merge key by key, anything else is replaced whole."""
    where = dict(base.where)

    def walk(b, o, path):
        if isinstance(b, dict) and isinstance(o, dict):
            out = dict(b)
            for k, v in o.items():
                out[k] = walk(b[k], v, path + (k,)) if k in b else v
                if k not in b or not (isinstance(b[k], dict) and isinstance(v, dict)):
                    # replaced subtree: drop the base's locations under it
                    for p in [p for p in where if p[: len(path) + 1] == path + (k,)]:
                        del where[p]
            return out
        return o

    value = walk(base.value, override.value, ())
    where.update(override.where)
    return Located(value, where)
