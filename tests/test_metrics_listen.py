"""--metrics-listen end to end: a real supervisor answering GET /metrics and GET /status over TCP on 127.0.0.1,
nothing else (no control verb reachable, whatever the method), bounded in connections, and the Grafana example
dashboard written only in metric names a real scrape has. Bad addresses are one line and exit 2.
"""

from __future__ import annotations

import http.client
import json
import re
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import ROOT, Supervise, free_port, supervise_command, write_release

DASHBOARD = Path(ROOT) / "examples" / "grafana" / "supervise-dashboard.json"
CONTROL_VERBS = [("POST", "/upgrade"), ("POST", "/upgrade?force=1"), ("POST", "/rollback"), ("POST", "/stop"),
                 ("POST", "/signal/TERM"), ("POST", "/scale/3"), ("GET", "/events"), ("GET", "/upgrade"),
                 ("GET", "/"), ("GET", "/metrics/../stop")]
ACTED = {"upgrade-requested", "stopping", "scale-requested", "signal-forwarded", "spawned"}  # what a verb would do


def request(port: int, method: str, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a fresh connection to 127.0.0.1:port: status, headers, body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def start(running: list[Supervise], tmp_path: Path, *options: str) -> tuple[Supervise, int]:
    """A supervisor of the stub server on a free port, with `options`; its metrics address once it is serving."""
    script = write_release(tmp_path / "app", "--tag", "v1")
    port = free_port()
    while str(port) in " ".join(options):  # not the metrics port, not yet bound when this one was picked
        port = free_port()
    supervise = Supervise(["-l", f"127.0.0.1:{port}", "--drain-timeout", "5s", *options, "--", str(script)]).start()
    running.append(supervise)
    supervise.wait_for("serving")
    address = supervise.wait_for("metrics-listening")["address"]
    return supervise, int(address.rsplit(":", 1)[1])


def scrape(port: int) -> dict[str, object]:
    status, headers, body = request(port, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4"), (status, headers)
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def serving_generations(status: dict) -> list[int]:
    return [generation["number"] for generation in status["generations"] if generation["state"] == "serving"]


@pytest.mark.timeout(60)
def test_metrics_and_status_over_tcp_and_nothing_else(running: list[Supervise], tmp_path: Path) -> None:
    metrics_port = free_port()
    supervise, bound = start(running, tmp_path, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    assert bound == metrics_port

    families = scrape(metrics_port)
    assert [sample.value for sample in families["supervise_generation"].samples] == [1.0]  # type: ignore[attr-defined]
    over_socket = supervise.ctl("metrics")
    assert over_socket.returncode == 0, over_socket.stderr
    assert set(families) == {family.name for family in text_string_to_metric_families(over_socket.stdout)}

    status, headers, body = request(metrics_port, "GET", "/status")
    assert status == 200 and headers["Content-Type"].startswith("application/json"), (status, headers)
    answer = json.loads(body)
    assert serving_generations(answer) == [1] and answer["supervisor"]["pid"] == supervise.pid, answer["supervisor"]
    status, _, body = request(metrics_port, "HEAD", "/metrics")
    assert status == 200 and body == b""

    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/metrics", "/status"):
            assert request(metrics_port, method, path)[0] == 405, (method, path)
    for method, path in CONTROL_VERBS:
        assert request(metrics_port, method, path)[0] == 404, (method, path)

    time.sleep(0.5)  # what a verb would have started would show by now
    assert supervise.process.poll() is None
    after = supervise.ctl("status", "--json")
    assert after.returncode == 0, after.stderr
    assert [generation["number"] for generation in json.loads(after.stdout)["generations"]] == [1]
    acted = [event for event in supervise.events if event["event"] in ACTED and (event["event"], event.get("gen")) !=
             ("spawned", 1)]
    assert acted == [], "a request over TCP acted"


@pytest.mark.timeout(60)
def test_connections_are_bounded_and_the_config_file_sets_it(running: list[Supervise], tmp_path: Path) -> None:
    """Clients that connect and say nothing (or half a request) hold no more than the limit: the oldest make way,
    and a scrape is still answered at once. metrics_listen comes from the config file here."""
    metrics_port = free_port()
    config = tmp_path / "supervise.toml"
    config.write_text(f'metrics_listen = "127.0.0.1:{metrics_port}"\n')
    _, bound = start(running, tmp_path, "--config", str(config))
    assert bound == metrics_port
    silent = []
    for index in range(40):
        sock = socket.create_connection(("127.0.0.1", metrics_port), timeout=5)
        if index % 2:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        silent.append(sock)
    try:
        began = time.monotonic()
        assert "supervise_generation" in scrape(metrics_port)
        assert time.monotonic() - began < 2.0
        closed: set[int] = set()
        deadline = time.monotonic() + 5
        while len(closed) < 25 and time.monotonic() < deadline:
            readable, _, _ = select.select([sock for sock in silent if sock.fileno() not in closed], [], [], 0.2)
            for sock in readable:
                try:
                    gone = sock.recv(1) == b""
                except ConnectionResetError:
                    gone = True
                if gone:
                    closed.add(sock.fileno())
        assert len(closed) >= 25, f"only {len(closed)} of 40 idle connections were closed to admit new ones"
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.timeout(60)
def test_dashboard_uses_only_exported_metric_names(running: list[Supervise], tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert {"type": "datasource", "query": "prometheus"}.items() <= dashboard["templating"]["list"][0].items()
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    exprs += [annotation["expr"] for annotation in dashboard["annotations"]["list"] if "expr" in annotation]
    used = {name for expr in exprs for name in re.findall(r"\bsupervise_[a-z0-9_]+", expr)}
    assert "supervise_generation_accept_queue" in used and "supervise_upgrades_total" in used, used

    metrics_port = free_port()
    _, _ = start(running, tmp_path, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    exported = set()
    for family in scrape(metrics_port).values():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])  # type: ignore[attr-defined]
        exported |= {family.name + suffix for suffix in suffixes}  # type: ignore[attr-defined]
        exported |= {sample.name for sample in family.samples}  # type: ignore[attr-defined]
    assert used - exported == set(), f"the dashboard queries metrics that are not exported: {sorted(used - exported)}"


def run_supervise(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*supervise_command(), *args], capture_output=True, text=True, timeout=10,
                          stdin=subprocess.DEVNULL)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("supervise: error: "), result.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("address", ["unix:/tmp/metrics.sock", "udp://127.0.0.1:9100", "127.0.0.1:99999",
                                     "web=127.0.0.1:9100", "nonsense", ""])
def test_a_bad_address_is_one_line_and_exit_2(address: str) -> None:
    assert_one_line(run_supervise("--metrics-listen", address, "--", "true"), 2, "--metrics-listen")


@pytest.mark.timeout(30)
def test_a_bad_address_in_the_config_file_and_a_port_in_use(tmp_path: Path) -> None:
    config = tmp_path / "supervise.toml"
    config.write_text('command = ["true"]\nmetrics_listen = "unix:/tmp/metrics.sock"\n')
    assert_one_line(run_supervise("--config", str(config)), 2, "metrics_listen", "TCP address")

    marker = tmp_path / "started"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = run_supervise("-l", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{busy}", "--",
                               "sh", "-c", f"touch {marker}; sleep 5")
    assert_one_line(result, 1, "--metrics-listen", "address already in use")
    assert not marker.exists(), "the child was started although the metrics port was in use"
