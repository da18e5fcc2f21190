"""``Tensor``: a named host array, as MindSpore Lite's inputs and outputs are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dinb.errors import InputError
from dinb.formats.safetensors import np_dtype


class Tensor:
    """A named host tensor: ``Tensor(np_array)``, ``set_data_from_numpy``, ``get_data_to_numpy``."""

    def __init__(self, data: Any = None, name: str = "", shape: Sequence[int] | None = None,
                 dtype: Any = None):
        if data is not None:
            self._data = np.ascontiguousarray(data)
        else:
            dt = np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype or np.float32)
            self._data = np.zeros(tuple(shape or ()), dtype=dt)
        self.name = name

    @property
    def shape(self) -> list[int]:
        return list(self._data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    @property
    def element_num(self) -> int:
        """Number of elements."""
        return int(self._data.size)

    @property
    def data_size(self) -> int:
        """Size in bytes."""
        return int(self._data.nbytes)

    def set_data_from_numpy(self, array: np.ndarray) -> None:
        """Fill the tensor; shape and dtype must match the tensor's own."""
        array = np.asarray(array)
        if array.shape != self._data.shape or array.dtype != self._data.dtype:
            raise InputError(
                f"tensor {self.name!r} is {self._data.dtype}{list(self._data.shape)}, got "
                f"{array.dtype}{list(array.shape)}; pass np.asarray(x, dtype="
                f"np.{self._data.dtype}) of shape {tuple(self._data.shape)}"
            )
        self._data = np.ascontiguousarray(array)

    def get_data_to_numpy(self) -> np.ndarray:
        return self._data

    def __repr__(self) -> str:
        return f"Tensor(name={self.name!r}, shape={self.shape}, dtype={self.dtype})"
