"""The notebook side: ipyparallel engines as ranks (``cluster`` in the kernel, ``engine`` in each
rank) and the ``%dinfer`` magics. The top layer but the CLI: it may import every layer below
(an engine serves as a serving agent); nothing below imports it.
"""
