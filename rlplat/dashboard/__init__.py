"""Run dashboard: a self-contained HTML page per run directory, and ``rlplat dashboard RUN_DIR`` to serve it live.

File formats and metric keys: ``rlplat.dashboard.metrics_schema``. The writer: ``rlplat.runlog.RunLog``.
"""

from rlplat.dashboard.render import render_dashboard
from rlplat.dashboard.serve import register

__all__ = ["register", "render_dashboard"]
