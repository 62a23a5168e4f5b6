"""Walking and editing JSON-like documents by path, for the property tests that mutate a real
manifest or model metadata field by field."""

from __future__ import annotations

from typing import Any, Iterator

#: the value that removes a field instead of replacing it
DELETE = object()


def paths(obj: Any, at: tuple = ()) -> Iterator[tuple]:
    """Every path in ``obj`` (the root ``()`` first), as tuples of keys and list indices."""
    yield at
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, at + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, at + (i,))


def set_path(doc: Any, path: tuple, value: Any) -> Any:
    """``doc`` with the value at ``path`` replaced (or removed with :data:`DELETE`), in place;
    the root path replaces the whole document (``None`` for a deleted root)."""
    if not path:
        return None if value is DELETE else value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc
