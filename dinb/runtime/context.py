"""``Context``: where a rank runs and with which provider (MindSpore Lite's shape).

Two equivalent spellings::

    ctx = Context(target=["gpu"], device_id=0, rank_id=0, provider="xla")

    ctx = Context()                 # as in MindSpore Lite's example
    ctx.target = ["gpu"]
    ctx.gpu.device_id = ctx.gpu.rank_id
    ctx.gpu.provider = "xla"

``rank_id`` defaults to the rank mpiexec gave the process (0 outside MPI). Providers: ``xla``
(default, CPU and GPU: one SPMD program compiled by XLA) and ``tensorrt`` (each rank's program
as ONNX models run by ONNX Runtime with the TensorRT, CUDA or CPU execution provider, the first
available, said aloud when it is not TensorRT; see :mod:`dinb.runtime.runners.onnx`).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

from dinb.errors import DinbError, ProviderError

PROVIDERS = ("xla", "tensorrt")
TARGETS = ("cpu", "gpu")


class ModelType(enum.Enum):
    """Kind of model file. dinb's slice files are ``DINB``; ``MINDIR`` is named for clarity."""

    DINB = "dinb"
    MINDIR = "mindir"


def _env_rank() -> int | None:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return None


@dataclass
class DeviceInfo:
    """Per-target settings: device id, rank id and provider."""

    device_id: int | None = None
    rank_id: int | None = field(default_factory=_env_rank)
    provider: str = "xla"


class Context:
    """Run-time settings of one rank: ``target``, and per target ``device_id``/``rank_id``/``provider``."""

    def __init__(self, target: list[str] | str | None = None, device_id: int | None = None,
                 rank_id: int | None = None, provider: str | None = None):
        self.cpu = DeviceInfo()
        self.gpu = DeviceInfo()
        self.target = [target] if isinstance(target, str) else list(target or ["cpu"])
        info = self.device_info
        if device_id is not None:
            info.device_id = device_id
        if rank_id is not None:
            info.rank_id = rank_id
        if provider is not None:
            info.provider = provider

    @property
    def device_info(self) -> DeviceInfo:
        """The settings of the first (active) target."""
        return self.gpu if self.target_name == "gpu" else self.cpu

    @property
    def target_name(self) -> str:
        if not self.target:
            raise DinbError("Context.target is empty; set it to ['cpu'] or ['gpu']")
        name = str(self.target[0]).lower()
        if name not in TARGETS:
            raise DinbError(
                f"Context.target {self.target!r}: dinb runs on {list(TARGETS)} "
                "(Ascend is MindSpore's own hardware)"
            )
        return name

    def check_provider(self) -> str:
        """Validate the provider for the target; raise :class:`ProviderError` with what to do."""
        provider = self.device_info.provider
        if provider not in PROVIDERS:
            raise ProviderError(f"provider {provider!r} is unknown; choose one of {list(PROVIDERS)}")
        if provider == "tensorrt":
            from dinb.runtime.runners.onnx import check_installed

            check_installed()
        return provider

    def __repr__(self) -> str:
        i = self.device_info
        return (f"Context(target={self.target}, device_id={i.device_id}, rank_id={i.rank_id}, "
                f"provider={i.provider!r})")
