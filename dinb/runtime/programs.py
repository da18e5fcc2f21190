"""Reading a slice file's serialized program back as a ``jax.export.Exported``."""

from __future__ import annotations

from typing import Any

from dinb.errors import SliceFileError
from dinb.export.slicefile import SliceFile


def deserialize(sf: SliceFile, which: int | str = 1, what: str = "the program") -> Any:
    """Program ``which`` of ``sf`` (1: the file's ``program``; a micro-batch count or a prefill
    name: ``program/<which>``). A file this JAX cannot read is a :class:`SliceFileError` naming
    the file, ``what`` and both JAX versions."""
    import jax
    from jax import export as jax_export

    try:
        return jax_export.deserialize(bytearray(sf.program_for(which)))
    except Exception as e:  # flatbuffers or a JAX version that cannot read this serialization
        raise SliceFileError(
            f"{sf.path}: {what} cannot be read by jax {jax.__version__} ({type(e).__name__}: {e}); it "
            f"was exported with jax {sf.meta.get('jax_version', 'unknown')}. Export again with this JAX."
        ) from None
