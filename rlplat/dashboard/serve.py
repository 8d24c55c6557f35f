"""``rlplat dashboard RUN_DIR``: serve a run's dashboard on localhost, regenerated from the run's files on every
request, so a live run updates (the page polls ``data.json`` and redraws in place)."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from rlplat.dashboard.render import check_run_dir, dashboard_data, render_html

# 8265 is Ray's dashboard, which a run on the same machine may be using.
DEFAULT_PORT = 8275
DEFAULT_HOST = "127.0.0.1"


def _handler(run_dir: Path, refresh_s: float) -> type[BaseHTTPRequestHandler]:
    class DashboardHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            try:
                if url.path in ("/", "/index.html", "/dashboard.html"):
                    body = render_html(run_dir, live=True, refresh_s=refresh_s).encode()
                    self._send(HTTPStatus.OK, "text/html; charset=utf-8", body)
                elif url.path == "/data.json":
                    since = parse_qs(url.query).get("since", [None])[0]
                    body = json.dumps(dashboard_data(run_dir, since)).encode()
                    self._send(HTTPStatus.OK, "application/json", body)
                else:
                    self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")
            except (ValueError, OSError) as err:  # e.g. the run directory was removed while serving
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", f"{err}\n".encode())

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # the page polls every few seconds: stay quiet
            pass

    return DashboardHandler


def make_server(
    run_dir: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, refresh_s: float = 5.0
) -> ThreadingHTTPServer:
    """A bound, not yet serving, server (port 0 picks a free port: read ``server.server_address``)."""
    path = check_run_dir(run_dir)
    if refresh_s <= 0:
        raise ValueError(f"--refresh must be > 0 seconds, got {refresh_s}")
    try:
        server = ThreadingHTTPServer((host, port), _handler(path, refresh_s))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is in use; pass --port N, or --port 0 for a free one"
            ) from err
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    server.daemon_threads = True
    return server


def serve(
    run_dir: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, refresh_s: float = 5.0
) -> int:
    server = make_server(run_dir, host, port, refresh_s)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {Path(run_dir)} at http://{bound_host}:{bound_port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Serve from a daemon thread (tests, notebooks); stop with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return thread


def _main(args: argparse.Namespace) -> int:
    return serve(args.run_dir, args.host, args.port, args.refresh)


def register(sub) -> None:
    p = sub.add_parser("dashboard", help="serve a run's live dashboard on localhost")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (holds metrics.jsonl, rollouts.jsonl)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)"
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"interface to listen on (default {DEFAULT_HOST})")
    p.add_argument("--refresh", type=float, default=5.0, help="seconds between the page's data polls")
    p.set_defaults(func=_main)
