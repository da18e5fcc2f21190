"""MindSpore Serving's server functions: ``start_grpc_server``, ``start_restful_server``, ``stop``.

Both servers speak the Open Inference Protocol v2 (:mod:`dinb.serving.rest`,
:mod:`dinb.serving.grpc_service`) for every servable started in this process, and bind
127.0.0.1 unless an address says otherwise.
"""

from __future__ import annotations

from dinb.errors import DinbError
from dinb.serving.main import Main


def _main() -> Main:
    main = Main.current()
    if main is None or not main.servables:
        raise DinbError("no servable is started; call distributed.start_servable(...) first")
    return main


def start_grpc_server(address: str = "127.0.0.1:5500", max_msg_mb_size: int = 100) -> None:
    """Serve every started servable over gRPC at ``address``."""
    from dinb.serving import grpc_service

    main = _main()
    if main.grpc is not None:
        raise DinbError("the gRPC server is already started in this process")
    main.grpc = main.call(grpc_service.start(main, address, max_msg_mb_size * 2**20), 30)


def start_restful_server(address: str = "127.0.0.1:1500", max_msg_mb_size: int = 100) -> None:
    """Serve every started servable over REST (HTTP/1.1) at ``address``."""
    from dinb.serving import rest

    main = _main()
    if main.rest is not None:
        raise DinbError("the REST server is already started in this process")
    main.rest = main.call(rest.start(main, address, max_msg_mb_size * 2**20), 30)


def stop(drain_s: float = 30.0) -> None:
    """Finish the requests in flight (at most ``drain_s``), stop the agents and the servers."""
    main = Main.current()
    if main is not None:
        main.stop(drain_s)
