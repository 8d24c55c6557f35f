"""Ray start-up: a local instance when no cluster is configured, the cluster of ``RAY_ADDRESS`` otherwise."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_connected: list[str] = []  # what init_ray connected this process to, for the progress bar's label


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A TCP connect to host:port first: ray.init waits minutes on an address where nothing listens."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.hostname is None or parsed.port is None:
        raise ValueError(f"RAY_ADDRESS={address!r} is not host:port (or ray://host:port, or auto)")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s).close()
    except OSError as err:
        raise ValueError(
            f"cannot reach Ray at RAY_ADDRESS={address!r} ({err}). Start a cluster with `ray start --head` "
            "(and export RAY_AUTH_MODE=token for Ray ≥ 2.60), or unset RAY_ADDRESS for a local instance"
        ) from err


def init_ray(num_cpus: int | None = None) -> str:
    """Connect to Ray; returns 'local' or the cluster address. Raises ValueError when the address is unreachable."""
    import ray

    if ray.is_initialized():
        return _connected[0] if _connected else "existing"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    # Workers import rlplat from this checkout; the cluster path ships it with `ray job submit --working-dir .`.
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
            _connected[:] = [address]
            return address
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"cannot connect to Ray at RAY_ADDRESS={address!r}: {err}. Start a cluster with `ray start --head` "
            "(and export RAY_AUTH_MODE=token for Ray ≥ 2.60), or unset RAY_ADDRESS for a local instance"
        ) from err
    _connected[:] = ["local"]
    return "local"
