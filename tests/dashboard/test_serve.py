import argparse
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from rlplat.dashboard import metrics_schema as M
from rlplat.dashboard.serve import DEFAULT_HOST, DEFAULT_PORT, make_server, register, serve_in_thread


@pytest.fixture
def server(synthetic_run):
    srv = make_server(synthetic_run, port=0)
    serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(srv, path):
    host, port = srv.server_address[:2]
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_serves_live_page_and_data(server, synthetic_run):
    status, ctype, body = _get(server, "/")
    assert status == 200 and ctype.startswith("text/html")
    assert b"data.json?since=" in body and b'id="chart-step_time"' in body
    _, ctype, body = _get(server, "/data.json")
    data = json.loads(body)
    assert ctype == "application/json" and len(data["figures"]["reward"]["data"][0]["x"]) == 20
    _, _, body = _get(server, "/data.json?since=" + urllib.request.quote(data["signature"]))
    assert json.loads(body)["unchanged"] is True
    # Regenerated per request: a new step shows up without restarting the server.
    with (synthetic_run / M.METRICS_FILE).open("a") as f:
        f.write(json.dumps({"step": 20, M.REWARD_MEAN: 0.95}) + "\n")
    _, _, body = _get(server, "/data.json?since=" + urllib.request.quote(data["signature"]))
    assert json.loads(body)["figures"]["reward"]["data"][0]["x"][-1] == 20
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(server, "/nope")
    assert err.value.code == 404


def test_static_render_has_no_polling(synthetic_run):
    from rlplat.dashboard.render import render_html

    assert "data.json" not in render_html(synthetic_run)


def test_clear_errors(tmp_path, synthetic_run):
    with pytest.raises(ValueError, match="is not a run directory"):
        make_server(tmp_path, port=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ValueError, match=f"port {port} on 127.0.0.1 is in use; pass --port N, or --port 0"
        ):
            make_server(synthetic_run, port=port)


def test_cli_arguments():
    parser = argparse.ArgumentParser(prog="rlplat")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dashboard", "runs/x"])
    assert (args.run_dir, args.port, args.host) == ("runs/x", DEFAULT_PORT, DEFAULT_HOST)
    args = parser.parse_args(["dashboard", "runs/x", "--port", "0", "--host", "0.0.0.0"])
    assert (args.port, args.host) == (0, "0.0.0.0")


def _sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_cleanly(synthetic_run):
    code = "import sys; from rlplat.dashboard.serve import serve; sys.exit(serve(sys.argv[1], port=0))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(synthetic_run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # an ignored or blocked SIGINT is inherited through exec (a library thread of this process may have
        # left either), and the child then never sees Ctrl-C: it starts with SIGINT as from a terminal
        preexec_fn=_sigint_as_from_a_terminal,
    )
    try:
        line = proc.stdout.readline()
        assert "serving" in line and "Ctrl-C to stop" in line
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "data.json", timeout=30) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGINT)
        # a hang detector, not a speed bound: a CI run beside a heavy job once took over 30 s to exit here
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err
