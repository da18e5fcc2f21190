"""Progress bars: tqdm.auto (a widget in notebooks, text in terminals), quiet when not wanted."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str = "", disable: bool = False, **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a ``tqdm.auto`` bar unless ``disable``."""
    if disable:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, **kwargs)
