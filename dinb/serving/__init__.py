"""Distributed serving with MindSpore Serving's shape: Main, a Distributed Worker, one Agent a rank.

    from dinb.serving import distributed, register, server
    from dinb.serving.client import Client

Main (:mod:`dinb.serving.main`) serves every servable over REST and gRPC, both speaking the Open
Inference Protocol v2 (KServe v2 / Triton), so ``tritonclient`` and ``curl`` work unchanged; the
Distributed Worker (:mod:`dinb.serving.worker`) runs the model on the agents; each Agent
(:mod:`dinb.serving.agent`) is one rank holding its slice file. See ``docs/architecture.md``.

Layer: above the runtime (agents run ``Model``) and the job; beside the explorer, which it does
not know; only the notebook side and the CLI import it.
"""

from dinb.job.addresses import free_port
from dinb.serving import distributed, register, server

__all__ = ["distributed", "free_port", "register", "server"]
