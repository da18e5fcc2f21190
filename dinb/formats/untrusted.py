"""Typed access to decoded JSON that came from a file: every field is checked before it is used.

A header read from disk may hold anything: a list where an object belongs, a string for a size, a
shape of 195 axes, a negative length. :class:`Fields` reads such data field by field and raises
the reader's own typed error (``SliceFileError``, ``CheckpointError``, ``StrategyError``) with
the file and the field path in the message, instead of a ``KeyError`` or ``TypeError`` from deep
inside, and before anything is allocated from the numbers it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NoReturn

from dinb.errors import DinbError

MAX_NDIM = 64  # numpy's limit on axes
MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class Fields:
    """Checked reads of untrusted JSON; errors are ``error(f"{source}: {what}: ...")``."""

    error: type[DinbError]
    source: str

    def fail(self, message: str) -> NoReturn:
        raise self.error(f"{self.source}: {message}")

    def json(self, raw: bytes | str, what: str) -> Any:
        """Parse JSON text (strict UTF-8); malformed text is an error naming ``what``."""
        try:
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8")
            return json.loads(raw)
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not UTF-8 text (byte {e.start})")
        except (ValueError, RecursionError) as e:
            self.fail(f"{what} is not valid JSON ({e})")

    def obj(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(f"{what} must be a JSON object, found {_kind(value)}")
        return value

    def get(self, d: dict[str, Any], key: str, what: str, kind: type | tuple[type, ...],
            default: Any = ...) -> Any:
        """``d[key]`` checked to be of ``kind`` (``default`` when absent, if given)."""
        if key not in d:
            if default is not ...:
                return default
            self.fail(f"{what} lacks field {key!r}")
        return self.check(d[key], f"{what}.{key}", kind)

    def check(self, value: Any, what: str, kind: type | tuple[type, ...]) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if int in kinds and isinstance(value, int) and not isinstance(value, bool):
            return value
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            self.fail(f"{what} must be {names}, found {_kind(value)}")
        return value

    def int(self, value: Any, what: str, minimum: int | None = None) -> int:
        v = self.check(value, what, int)
        if minimum is not None and v < minimum:
            self.fail(f"{what} is {v}; it must be at least {minimum}")
        return int(v)

    def ints(self, value: Any, what: str, minimum: int | None = None,
             max_len: int | None = None) -> tuple[int, ...]:
        items = self.check(value, what, list)
        if max_len is not None and len(items) > max_len:
            self.fail(f"{what} has {len(items)} entries; at most {max_len} are allowed")
        return tuple(self.int(v, f"{what}[{i}]", minimum) for i, v in enumerate(items))

    def shape(self, value: Any, what: str) -> tuple[int, ...]:
        """A tensor shape: at most 64 axes, each a size >= 0."""
        return self.ints(value, what, minimum=0, max_len=MAX_NDIM)


_KIND_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
               bool: "true or false", float: "a number"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return _KIND_NAMES.get(type(value), type(value).__name__)
