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
from tests.browser import stop
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


def test_the_startup_message_names_the_port_the_server_took(tiny_lake, tmp_path):
    """Streamlit's default port taken (here by the test): Streamlit listens on the next one, and
    vlatlas's message names that one, not the default."""
    import re
    import socket

    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        held.bind(("127.0.0.1", 8501))
        held.listen()
    except OSError:  # already taken by someone else: as good
        held.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(HOME=str(tmp_path), STREAMLIT_SERVER_FILE_WATCHER_TYPE="none")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "app", "--lake", str(tiny_lake)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said, deadline = "", time.monotonic() + 90
        while time.monotonic() < deadline and "vlatlas: serving" not in said:
            line = proc.stderr.readline()
            if not line:
                break
            said += line
        m = re.search(r"vlatlas: serving .* at http://127\.0\.0\.1:(\d+)", said)
        assert m, said
        port = int(m.group(1))
        assert port != 8501
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5).read() == b"ok"
    finally:
        held.close()
        stop(proc, 30)
