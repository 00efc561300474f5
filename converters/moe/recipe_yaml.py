"""YAML reading that remembers where every value came from, so recipe errors can name a file and line.

`load_tracked` returns plain Python values (dicts, lists, scalars, as `yaml.safe_load` would) together with a
map from a field path such as ``("experts", 2, "positive_prompts")`` to its 1-based line number.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import SafeConstructor

FieldPath = tuple[str | int, ...]


class RecipeError(ValueError):
    """A recipe is unusable. The message is one line: ``file:line: field: what was expected``."""

    def __init__(self, file: str, line: int | None, field: str, message: str):
        self.file, self.line, self.field, self.message = file, line, field, message
        where = f"{file}:{line}" if line else file
        text = f"{where}: {field}: {message}" if field else f"{where}: {message}"
        super().__init__(" ".join(text.split()))  # one line, whatever the parts contained


def field_name(path: FieldPath) -> str:
    """``("experts", 2, "positive_prompts")`` -> ``"experts[2].positive_prompts"``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_tracked(text: str, file: str) -> tuple[Any, dict[FieldPath, int]]:
    """Parse one YAML document; return ``(value, lines)`` where ``lines`` maps field paths to 1-based lines.

    The empty path ``()`` maps to the line of the top-level value. Duplicate mapping keys are errors (plain YAML
    loaders keep the last one silently, which hides typos). Raises RecipeError on any YAML problem.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError(file, line, "", f"YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise RecipeError(file, None, "", f"YAML syntax error: {e}") from None
    if node is None:
        raise RecipeError(file, 1, "", "the recipe is empty; expected a mapping with base_model and experts")
    lines: dict[FieldPath, int] = {(): node.start_mark.line + 1}
    builder = _Builder(file, lines)
    return builder.build(node, ()), lines


class _Builder:
    """Turns composed YAML nodes into Python values while recording line numbers."""

    def __init__(self, file: str, lines: dict[FieldPath, int]):
        self.file, self.lines = file, lines
        self.constructor = SafeConstructor()
        self.active: set[int] = set()  # nodes on the current path: a recursive alias would never end
        self.flattened: set[int] = set()  # mappings whose merge keys are already resolved (aliases share nodes)

    def check_unique_keys(self, node: yaml.MappingNode, path: FieldPath) -> None:
        """Refuse a key written twice in one mapping (keys pulled in by ``<<:`` merges may be overridden)."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.build(key_node, path)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise self.fail(key_node, path, "mapping keys must be plain names")
            if key in seen:
                raise self.fail(key_node, path + (str(key),), "key given twice")
            seen.add(key)

    def fail(self, node: yaml.Node, path: FieldPath, message: str) -> RecipeError:
        return RecipeError(self.file, node.start_mark.line + 1, field_name(path), message)

    def build(self, node: yaml.Node, path: FieldPath) -> Any:
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.constructor.construct_object(node, deep=True)
            except yaml.YAMLError as e:
                raise self.fail(node, path, f"bad value: {getattr(e, 'problem', e)}") from None
        if id(node) in self.active:
            raise self.fail(node, path, "a YAML alias refers to itself")
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                out_list = []
                for i, item in enumerate(node.value):
                    self.lines[path + (i,)] = item.start_mark.line + 1
                    out_list.append(self.build(item, path + (i,)))
                return out_list
            if id(node) not in self.flattened:
                self.check_unique_keys(node, path)
                try:  # resolve YAML merge keys (<<: *anchor) the way safe_load does; later keys override
                    self.constructor.flatten_mapping(node)
                except yaml.YAMLError as e:
                    raise self.fail(node, path, f"bad YAML merge: {getattr(e, 'problem', e)}") from None
                self.flattened.add(id(node))
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.build(key_node, path)
                self.lines[path + (str(key),)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, path + (str(key),))
            return out
        finally:
            self.active.discard(id(node))
