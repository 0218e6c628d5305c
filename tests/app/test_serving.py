"""Serving the app to a team: `vlatlas app` listens on loopback unless the user's Streamlit
configuration or ``--address`` says otherwise, names the port it really listens on, stays small while
it waits on Streamlit, turns live uploads off with ``--read-only``, and the browser asks nothing of any
other machine; live examples appended to one run by two processes at once are serialised (a lock on a
disk lake, a conditional put on S3, moto's server standing in for it).

One `vlatlas app --read-only --port 0` server (module-scoped, started as a user would, with no
Streamlit configuration) serves the browser checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from lake.catalog import Catalog
from lake.commit import done_chunks, read_run_row
from lake.store import LockTimeout, open_store
from pipeline.cli import LOCAL_DEFAULTS, streamlit_command
from tests.browser import ROOT, require_chromium, settle, stop, tiny_vilt_lake
from tests.objstore import moto_s3
from tests.tiny import listing, noise_image, png

RUN = "tiny"
PAGES = ("", "head_summary", "attention", "hidden_states", "compare", "sql")
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def user_env(home: Path) -> dict[str, str]:
    """The environment of a user with no Streamlit configuration (no STREAMLIT_* variable, an empty
    home), as `vlatlas app` sees it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(HOME=str(home), STREAMLIT_SERVER_FILE_WATCHER_TYPE="none")
    return env


@pytest.fixture(scope="module")
def vilt(tmp_path_factory):
    """The tiny random ViLT (``model``) and a lake of its run ``tiny`` over six scenes (``lake``)."""
    tmp = tmp_path_factory.mktemp("serving")
    return {"lake": tiny_vilt_lake(tmp), "model": tmp / "model", "tmp": tmp}


# -- the command line ---------------------------------------------------------------------------
def test_loopback_and_no_usage_statistics_unless_configured(tmp_path, monkeypatch):
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    for k in [k for k in os.environ if k.startswith("STREAMLIT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)

    def options(cmd: list[str]) -> dict[str, str]:
        return dict(zip(cmd[5::2], cmd[6::2]))

    assert options(streamlit_command(None, None, True, defaults=LOCAL_DEFAULTS)) == {
        "--server.address": "127.0.0.1", "--browser.gatherUsageStats": "false"}
    # --address wins
    assert options(streamlit_command(9000, None, True, "0.0.0.0", LOCAL_DEFAULTS)) == {
        "--server.address": "0.0.0.0", "--browser.gatherUsageStats": "false", "--server.port": "9000"}
    # the user's environment variable
    monkeypatch.setenv("STREAMLIT_SERVER_ADDRESS", "0.0.0.0")
    monkeypatch.setenv("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "true")
    assert options(streamlit_command(None, None, True, defaults=LOCAL_DEFAULTS)) == {}
    monkeypatch.delenv("STREAMLIT_SERVER_ADDRESS")
    monkeypatch.delenv("STREAMLIT_BROWSER_GATHER_USAGE_STATS")
    # the project's .streamlit/config.toml, then the user's ~/.streamlit/config.toml
    (project / ".streamlit").mkdir()
    (project / ".streamlit" / "config.toml").write_text('[server]\naddress = "0.0.0.0"\n')
    assert options(streamlit_command(None, None, True, defaults=LOCAL_DEFAULTS)) == {
        "--browser.gatherUsageStats": "false"}
    (project / ".streamlit" / "config.toml").unlink()
    (home / ".streamlit").mkdir()
    (home / ".streamlit" / "config.toml").write_text("[browser]\ngatherUsageStats = true\n")
    assert options(streamlit_command(None, None, True, defaults=LOCAL_DEFAULTS)) == {
        "--server.address": "127.0.0.1"}


# -- one server, as a user starts it ------------------------------------------------------------
@pytest.fixture(scope="module")
def app_server(vilt, tmp_path_factory):
    """`vlatlas app --lake LAKE --read-only --port 0`, no Streamlit configuration; yields the wrapper's
    process, the URL its startup message names and its stderr lines so far."""
    home = tmp_path_factory.mktemp("home")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "app", "--lake", str(vilt["lake"]), "--read-only",
                             "--port", "0"], cwd=ROOT, env=user_env(home), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "vlatlas: serving" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(120), "".join(lines)
        url = re.search(r"serving .* at (http://\S+)", "".join(lines)).group(1)
        yield {"proc": proc, "url": url, "lines": lines}
    finally:
        stop(proc, 30)


def _listening(port: int) -> list[str]:
    """The local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    out = []
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(f).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                if len(addr) == 8:
                    out.append(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    out.append("::1" if addr == "0" * 24 + "01000000" else f"ipv6:{addr}")
    return out


def test_the_server_listens_on_loopback_at_the_port_it_names(app_server):
    url = urllib.parse.urlsplit(app_server["url"])
    assert url.hostname == "127.0.0.1" and url.port and url.port != 0, app_server["url"]
    assert urllib.request.urlopen(f"{app_server['url']}/_stcore/health", timeout=5).read() == b"ok"
    addrs = _listening(url.port)
    assert addrs and set(addrs) <= {"127.0.0.1", "::1"}, addrs
    assert any("read-only" in line for line in app_server["lines"]), app_server["lines"]


def test_the_wrapper_does_not_load_torch_while_it_waits(app_server):
    pid = app_server["proc"].pid
    maps = Path(f"/proc/{pid}/maps").read_text()
    rss_mb = int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024
    print(f"the vlatlas app wrapper holds {rss_mb:.0f} MB")
    for lib in ("libtorch", "libarrow", "duckdb"):
        assert lib not in maps, f"the wrapper has loaded {lib}"
    assert rss_mb < 100, rss_mb


@pytest.mark.browser
def test_no_request_leaves_the_machine_and_uploads_are_off(app_server, browser):
    """Every page, with every request the browser makes logged: all go to the app's server (or are
    data:/blob: URLs); the favicon is the app's own; the read-only app offers no upload."""
    require_chromium()
    requests: list[str] = []
    failed: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("request", lambda r: requests.append(r.url))
    # (a page opened by its path first asks for /<page>/_stcore/health, then for /_stcore/health: Streamlit's
    # own search for its base URL, answered 404 on the way)
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}")
            if r.status >= 400 and "/_stcore/" not in r.url else None)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    for path in PAGES:
        page.goto(f"{app_server['url']}/{path}?run={RUN}&ex=1")
        settle(page)
        assert page.locator('[data-testid="stException"]').count() == 0, (path, page.inner_text("body")[:2000])
        if path == "":
            page.get_by_text("Add a live example").click()
            page.wait_for_selector("text=uploads are off", timeout=30_000)
            assert page.locator('[data-testid="stFileUploader"]').count() == 0
        time.sleep(1)  # what a drawn page still loads (images, charts)
    icon = page.evaluate("Array.from(document.querySelectorAll('link[rel~=icon]')).map(l => l.href)")
    page.close()
    assert icon and all(h.startswith((app_server["url"], "data:")) for h in icon), icon
    outside = sorted({u for u in requests
                      if not u.startswith(("data:", "blob:")) and urllib.parse.urlsplit(u).hostname not in LOCAL_HOSTS})
    assert len(requests) > 20 and not outside, outside
    assert not failed and not errors, (failed, errors)


# -- read-only ----------------------------------------------------------------------------------
def _app(lake, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("VLATLAS_LAKE", str(lake))
    at = AppTest.from_file(str(ROOT / "streamlit_app" / "app.py"), default_timeout=120)
    at.query_params["run"], at.query_params["ex"] = RUN, "1"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_read_only_offers_no_upload_and_appends_nothing(vilt, monkeypatch):
    from pipeline import live

    lake = vilt["lake"]
    monkeypatch.delenv(live.READ_ONLY_ENV, raising=False)
    at = _app(lake, monkeypatch)
    assert at.file_uploader and [b for b in at.button if b.key == "live_add"]  # uploads are on by default

    monkeypatch.setenv(live.READ_ONLY_ENV, "1")
    at = _app(lake, monkeypatch)
    info = " ".join(str(i.value) for i in at.info)
    assert "Live examples are not available" in info and "uploads are off" in info and "read-only" in info
    assert not at.file_uploader and not [b for b in at.button if b.key == "live_add"]
    before = listing(lake)
    with pytest.raises(live.LiveError, match="read-only"):
        live.add_live_example(lake, RUN, png(noise_image((64, 64))), "is there a red circle?")
    assert listing(lake) == before


# -- two processes, one run ---------------------------------------------------------------------
ADDER = """
import io, json, sys, time
from pipeline import live
from pipeline.models import load_adapter
from tests.tiny import noise_image

lake, run, model, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
adapter = load_adapter(model)  # loaded before the start, so that both add at the same moment
forward = adapter.forward


def slow(*a, **k):  # a real model's moment: without a lock both adders number their example before either writes
    time.sleep(2)
    return forward(*a, **k)


adapter.forward = slow
buf = io.BytesIO()
noise_image((64, 64), seed=seed).save(buf, format="PNG")
print("ready", flush=True)
sys.stdin.readline()
r = live.add_live_example(lake, run, buf.getvalue(), f"is there a circle number {seed}?", adapter=adapter, device="cpu")
print(json.dumps({"example_id": r.example_id, "source_id": r.source_id, "chunk": r.chunk}), flush=True)
"""


def add_at_once(lake: str, model: Path, env: dict | None = None) -> list[dict]:
    """Two processes, each with the run's model loaded, told to add a live example at the same moment."""
    procs = [subprocess.Popen([sys.executable, "-c", ADDER, lake, RUN, str(model), str(seed)], cwd=ROOT,
                              env=dict(os.environ, **(env or {})), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (11, 12)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
        for p in procs:  # the start
            p.stdin.write("go\n")
            p.stdin.flush()
        out = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr[-3000:]
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def assert_both_added(lake: str, results: list[dict]) -> None:
    ids = sorted(r["example_id"] for r in results)
    assert ids == [6, 7] and len({r["chunk"] for r in results}) == 2, results
    store = open_store(lake)
    assert {r["chunk"] for r in results} <= done_chunks(store, RUN)
    row = read_run_row(store, RUN)
    assert row["status"] == "complete" and row["n_examples"] == 8
    assert not store.exists(f"_state/{RUN}/live.lock")  # let go
    cat = Catalog(lake)
    ex = cat.df("SELECT example_id, source_id, split FROM examples WHERE run = ? ORDER BY example_id", [RUN])
    assert ex.example_id.tolist() == list(range(8))  # each once
    assert set(ex.source_id[ex.split == "live"]) == {r["source_id"] for r in results}
    for t, key in (("tokens", "example_id, token_idx"), ("head_stats", "example_id, stream, layer, head, stat"),
                   ("attention", "stream, layer, example_id, head, query_idx, key_idx")):
        d = cat.df(f"SELECT count(*) - count(DISTINCT ({key})) AS d, count(DISTINCT example_id) AS n "
                   f"FROM {t} WHERE run = ?", [RUN])
        assert d.d[0] == 0 and d.n[0] == 8, (t, d)
    assert cat.df("SELECT n_examples FROM runs WHERE run = ?", [RUN]).n_examples[0] == 8


@pytest.mark.slow
def test_two_processes_append_to_one_disk_run(vilt, tmp_path):
    import shutil

    lake = shutil.copytree(vilt["lake"], tmp_path / "lake")
    assert_both_added(str(lake), add_at_once(str(lake), vilt["model"]))


def test_a_disk_lock_is_held_until_let_go(tmp_path):
    store = open_store(tmp_path)
    with store.lock("_state/r/live.lock"):
        assert (tmp_path / "_state/r/live.lock").is_file()
        with pytest.raises(LockTimeout):  # a lock is per open file: this is a second holder
            with store.lock("_state/r/live.lock", wait_s=0.3):
                pass
    assert not (tmp_path / "_state/r/live.lock").exists()
    with store.lock("_state/r/live.lock", wait_s=0.3):  # free again
        pass


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback, with the AWS settings every process here inherits."""
    with moto_s3() as s:
        yield s


def test_an_s3_lock_is_a_create_only_object(s3):
    import boto3

    store = open_store(f"{s3['uri']}/locks")
    client = boto3.client("s3")
    with store.lock("_state/r/live.lock"):
        held = client.get_object(Bucket="vlatlas", Key="locks/_state/r/live.lock")["Body"].read().decode()
        assert f"pid {os.getpid()}" in held
        with pytest.raises(LockTimeout):
            with store.lock("_state/r/live.lock", wait_s=0.5):
                pass
        # the conditional put itself: S3 (here moto) refuses a second create
        with pytest.raises(client.exceptions.ClientError, match="PreconditionFailed|412"):
            client.put_object(Bucket="vlatlas", Key="locks/_state/r/live.lock", Body=b"x", IfNoneMatch="*")
    assert not store.exists("_state/r/live.lock")
    with store.lock("_state/r/live.lock", wait_s=0.5):
        pass


@pytest.mark.slow
def test_two_processes_append_to_one_s3_run(vilt, s3):
    from pipeline.extraction.run import extract
    from tests.tiny import make_manifest

    uri = f"{s3['uri']}/lakes/team"
    manifest = make_manifest(vilt["tmp"] / "s3-data", 6)
    extract(str(vilt["model"]), manifest, uri, RUN, batch_size=3, progress=False)
    assert_both_added(uri, add_at_once(uri, vilt["model"], s3["env"]))
