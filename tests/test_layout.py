"""Imports point down: the web app reaches the worker package only through its contract and outcome leaves."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import sys
from web import create_app
from web.dashboard import create_dashboard
create_app({"TESTING": True, "API_KEYS": ["k"]})
print(sorted(name for name in sys.modules if name == "worker" or name.startswith("worker.")))
"""


def test_web_imports_no_worker_module_but_the_contract():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['worker', 'worker.contract', 'worker.outcome']"


def test_worker_never_imports_web():
    probe = (
        "import sys, worker.jobs, worker.__main__\nprint(any(n == 'web' or n.startswith('web.') for n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
