"""Checking a predict's inputs against the export before any rank enters a collective."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinb.errors import InputError
from dinb.export.slicefile import TensorMeta
from dinb.formats.safetensors import np_dtype
from dinb.runtime.tensor import Tensor


def one_stage(micro_batches: int | None) -> None:
    """Refuse micro-batches for an export of one pipeline stage."""
    if micro_batches not in (None, 1):
        raise InputError(f"micro_batches={micro_batches!r}: this export has one pipeline stage; "
                         "micro-batches are for pipelined exports")


class InputCheck:
    """The export's inputs (names, shapes, dtypes) and the batch sizes its programs take."""

    def __init__(self, inputs: Sequence[TensorMeta], buckets: Sequence[int]):
        self.inputs = list(inputs)
        self.types = [(tuple(m.shape), np_dtype(m.dtype)) for m in self.inputs]
        self.buckets = list(buckets)

    def __call__(self, given: Sequence[Tensor | np.ndarray]) -> list[np.ndarray]:
        """The inputs as numpy arrays, each checked for count, shape and dtype."""
        if len(given) != len(self.inputs):
            raise InputError(f"the model takes {len(self.inputs)} inputs {[m.name for m in self.inputs]}, "
                             f"got {len(given)}")
        arrays: list[np.ndarray] = []
        for m, (shape, dtype), x in zip(self.inputs, self.types, given):
            a = x.get_data_to_numpy() if isinstance(x, Tensor) else np.asarray(x)
            if (a.shape != shape or a.dtype != dtype) and not self._a_bucket(a, shape, dtype, arrays):
                rows = f" (or {self.buckets} rows)" if self.buckets else ""
                raise InputError(
                    f"input {m.name!r} must be {m.dtype}{list(m.shape)}{rows} (as exported), got "
                    f"{a.dtype}{list(a.shape)}; convert with np.asarray(x, dtype=np.{m.dtype}) or export "
                    "again for this shape")
            arrays.append(a)
        return arrays

    def _a_bucket(self, a: np.ndarray, shape: tuple[int, ...], dtype: np.dtype,
                  before: list[np.ndarray]) -> bool:
        """Whether ``a`` is an input at one of the export's batch buckets (as those before it)."""
        return (bool(self.buckets) and a.dtype == dtype and a.ndim == len(shape)
                and a.shape[1:] == shape[1:] and a.shape[0] in self.buckets
                and (not before or before[0].shape[0] == a.shape[0]))
