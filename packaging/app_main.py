"""Entry point of the packaged application (copied to ``__main__.py`` of the staged folder).

The MAP starts ``python3 /opt/holoscan/app``, which puts that folder first on ``sys.path``;
the staged folder holds the ``app``, ``operators`` and ``msk_node`` packages there, and
this runs the ``app`` package exactly as ``python -m app`` does.
"""
import runpy

runpy.run_module("app", run_name="__main__", alter_sys=True)
