"""Every environment variable the code and the Procfile read is listed in .env.sample, and nothing else is."""

from __future__ import annotations

import re

from tests.conftest import ROOT

READ = re.compile(
    r"""env(?:iron)?\.get\(\s*["']([A-Z][A-Z0-9_]+)["']|env\[["']([A-Z][A-Z0-9_]+)["']\](?!\s*=[^=])"""
    r"""|env_(?:int|float|port)\(\s*\w+,\s*["']([A-Z][A-Z0-9_]+)["']"""
)
PROCFILE_READ = re.compile(r"\$\{([A-Z][A-Z0-9_]+)")
SAMPLE = re.compile(r"^([A-Z][A-Z0-9_]+)=", re.MULTILINE)
NOT_SETTINGS = {"PATH"}


def names_read_by_the_code() -> set[str]:
    names = set()
    for folder in ("web", "worker", "inference_server"):
        for path in (ROOT / folder).rglob("*.py"):
            for match in READ.finditer(path.read_text()):
                names.add(next(name for name in match.groups() if name))
    names.update(PROCFILE_READ.findall((ROOT / "Procfile").read_text()))
    return names - NOT_SETTINGS


def test_env_sample_lists_exactly_the_settings_the_code_reads():
    listed = set(SAMPLE.findall((ROOT / ".env.sample").read_text()))
    assert names_read_by_the_code() == listed
