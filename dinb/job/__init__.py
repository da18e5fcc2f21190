"""The job: how a process becomes rank r of N and talks to the other ranks' processes.

Joining (``ranks``, ``addresses``, ``launchers``), watching for dead ranks (``death_watch``), and
moving arrays between dinb's own processes (``wire``, ``remote_predict``, ``secure_socket``).
Imports only ``dinb.errors``, ``dinb.formats`` and the libraries; every layer above may use it.
"""
