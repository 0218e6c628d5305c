"""A Ray cluster for tests: ``ray start --head`` bound to 127.0.0.1, token-authenticated, stopped at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.tiny import free_port

BIN = Path(sys.executable).parent


@contextmanager
def ray_head(cpus: int):
    """Yield the address of a local head with ``cpus`` CPUs. Ray's token authentication uses a token of this
    cluster's own (the drivers the tests start inherit it), so a token left in ~/.ray by another cluster
    cannot get in the way; its workers inherit the environment (e.g. an object store's settings)."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="vray")  # short: Ray's socket paths live under it
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex, "RAY_USAGE_STATS_ENABLED": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in auth.items():
            mp.setenv(k, v)
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
               f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
               f"--temp-dir={temp}"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        try:
            yield f"127.0.0.1:{port}"
        finally:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=180)
            shutil.rmtree(temp, ignore_errors=True)
