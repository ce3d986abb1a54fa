"""Entry point of the packaged application (copied to ``__main__.py`` of the staged folder).

The MAP starts ``python3 /opt/holoscan/app``, which puts that folder first on ``sys.path``;
the staged folder holds the ``msk_node_app``, ``msk_node_operators`` and ``msk_node`` packages
there, and this runs ``msk_node_app`` exactly as ``python -m msk_node_app`` does.
"""
import runpy

runpy.run_module("msk_node_app", run_name="__main__", alter_sys=True)
