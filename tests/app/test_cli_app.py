"""`vlatlas app`: Streamlit's own configuration stays in charge, no terminal means headless, and
SIGTERM/SIGINT reach the server (a real Streamlit server on loopback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline.cli import streamlit_command
from tests.tiny import free_port


def test_only_what_the_user_gave():
    cmd = streamlit_command(None, None, interactive=True)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and not any(a.startswith("--") for a in cmd)
    assert streamlit_command(9000, None, interactive=True)[-2:] == ["--server.port", "9000"]
    assert streamlit_command(None, True, interactive=True)[-2:] == ["--server.headless", "true"]
    # no terminal: headless (Streamlit would otherwise wait at its e-mail prompt) ...
    assert streamlit_command(None, None, interactive=False)[-2:] == ["--server.headless", "true"]


def test_no_terminal_leaves_a_configured_headless_alone(monkeypatch):
    monkeypatch.setenv("STREAMLIT_SERVER_HEADLESS", "false")
    assert "--server.headless" not in streamlit_command(None, None, interactive=False)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_follows_streamlits_configuration_and_stops_with_vlatlas(tiny_lake, sig):
    port = free_port()
    env = dict(os.environ, STREAMLIT_SERVER_PORT=str(port), STREAMLIT_SERVER_ADDRESS="127.0.0.1",
               STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "app", "--lake", str(tiny_lake)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        ok = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:  # the port comes from STREAMLIT_SERVER_PORT: vlatlas passed none
                ok = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok"
                break
            except OSError:
                time.sleep(0.5)
        assert ok, proc.stderr.read() if proc.poll() is not None else "server did not answer"
        servers = _children(proc.pid)
        assert servers, "no server process"
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert proc.returncode == 0
        time.sleep(0.5)
        assert not any(os.path.exists(f"/proc/{p}") for p in servers), "the server outlived vlatlas"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _children(proc.pid):
            os.kill(p, signal.SIGKILL)
