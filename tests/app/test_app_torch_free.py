"""The app imports torch only when a live example runs.

A fresh interpreter imports every module of the app (``streamlit_app/*.py``) and runs the frame and
every page of ``streamlit_app/app_pages/`` under AppTest against the synthetic lake (tests/lakegen.py,
which imports no torch either); then ``torch`` (and ``transformers``) must not be in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(p.name for p in (ROOT / "streamlit_app" / "app_pages").glob("*.py") if p.name != "__init__.py")
MODULES = sorted(p.stem for p in (ROOT / "streamlit_app").glob("*.py") if p.stem not in ("__init__", "app"))

SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    from streamlit.testing.v1 import AppTest

    modules, pages, app = json.loads(sys.argv[1])
    for m in modules:
        importlib.import_module("streamlit_app." + m)
    errors = []
    at = AppTest.from_file(app, default_timeout=120)
    at.query_params["run"] = "synth"
    at.query_params["ex"] = "1"
    at.run()
    errors += [str(e.value) for e in at.exception]
    for p in pages:
        at.switch_page("app_pages/" + p).run()
        errors += [p + ": " + str(e.value) for e in at.exception]
    print(json.dumps({"errors": errors, "torch": "torch" in sys.modules,
                      "transformers": "transformers" in sys.modules}))
""")


def test_no_page_imports_torch(synth_lake):
    assert PAGES and "attention.py" in PAGES and "charts" in MODULES and "views" in MODULES
    env = dict(os.environ, VLATLAS_LAKE=str(synth_lake.root),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    arg = json.dumps([MODULES, PAGES, str(ROOT / "streamlit_app" / "app.py")])
    r = subprocess.run([sys.executable, "-c", SCRIPT, arg], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["errors"] == []
    assert out == {"errors": [], "torch": False, "transformers": False}
