"""Typed errors of dinb.

Every message says what is wrong, where (file, rank, parameter) and what to do. All errors
derive from :class:`DinbError`, so ``except dinb.DinbError`` catches exactly dinb's own.
"""

from __future__ import annotations


class DinbError(Exception):
    """Base class of every error dinb raises on purpose."""


class LayoutError(DinbError, ValueError):
    """A layout is malformed, or does not divide the shape it is applied to."""


class StrategyError(DinbError, ValueError):
    """A strategy (file) is malformed or does not fit the model it is used with."""


class SliceFileError(DinbError):
    """A slice file is missing, truncated, corrupted or from another export."""


class RankMismatchError(DinbError):
    """The number of ranks does not match the slice files or the exported program."""


class InputError(DinbError, ValueError):
    """An input tensor has the wrong count, shape or dtype."""


class ProviderError(DinbError):
    """The requested compute provider cannot be used on this machine."""


class ProviderFallbackWarning(UserWarning):
    """The provider asked for runs on a fallback (e.g. ONNX Runtime without TensorRT): said, never silent."""


class RankFailedError(DinbError):
    """One or more ranks failed or did not answer in time; ``ranks`` names them."""

    def __init__(self, message: str, ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.ranks = tuple(ranks)


class CheckpointError(DinbError):
    """A checkpoint slice is missing, duplicated, corrupted, or disagrees with its strategy."""


class ClusterError(DinbError):
    """The notebook's cluster of ranks is missing, already running, or could not start."""
