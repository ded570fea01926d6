"""Protobuf text format without protobuf: `parse_textproto`, `_find`, and TF OD API label maps (`read_label_map`)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from backbone.errors import DataError


def parse_textproto(text: str) -> dict[str, list[Any]]:
    """Minimal protobuf text-format reader: {field: [values or nested dicts]} (enough for pipeline.config)."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}:<>]|[^\s{}:<>#"\']+|#[^\n]*', text)
    tokens = [t for t in tokens if not t.startswith("#")]
    pos = 0

    def value(tok: str) -> Any:
        if tok[0] in "\"'":
            return tok[1:-1]
        if tok in ("true", "false"):
            return tok == "true"
        try:
            return int(tok)
        except ValueError:
            pass
        try:
            return float(tok)
        except ValueError:
            return tok  # enum

    def block(end: str | None) -> dict[str, list[Any]]:
        nonlocal pos
        out: dict[str, list[Any]] = {}
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == end:
                pos += 1
                return out
            name = tok
            pos += 1
            if pos < len(tokens) and tokens[pos] == ":":
                pos += 1
            if pos < len(tokens) and tokens[pos] in ("{", "<"):
                close = "}" if tokens[pos] == "{" else ">"
                pos += 1
                out.setdefault(name, []).append(block(close))
            else:
                out.setdefault(name, []).append(value(tokens[pos]))
                pos += 1
        if end is not None:
            raise ValueError("unbalanced braces")
        return out

    return block(None)


def _find(tree: Any, key: str) -> list[Any]:
    """All values of `key` anywhere in a parse_textproto tree (depth-first)."""
    found = []
    if isinstance(tree, dict):
        for k, vals in tree.items():
            if k == key:
                found.extend(vals)
            for v in vals:
                found.extend(_find(v, key))
    return found


def read_label_map(path: str | Path) -> tuple[list[int], list[str]]:
    """(ids, names) of a TF OD API label map (.pbtxt: item { id: N display_name/name: "..." })."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, "label map not found", "pass a TF OD API .pbtxt label map")
    items = _find(parse_textproto(path.read_text()), "item")
    pairs = sorted((int(it["id"][0]), str((it.get("display_name") or it.get("name") or [""])[0])) for it in items
                   if isinstance(it, dict) and "id" in it)
    if not pairs:
        raise DataError(path, "no `item { id: ... }` entries", "pass a TF OD API .pbtxt label map")
    return [i for i, _ in pairs], [n for _, n in pairs]
