"""The documentation site builds with no warnings (mkdocs --strict, API from docstrings)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


MKDOCS = Path(sys.executable).parent / "mkdocs"


@pytest.mark.skipif(not MKDOCS.exists() and shutil.which("mkdocs") is None,
                    reason="mkdocs (the docs extra) not installed")
def test_mkdocs_build_strict(tmp_path):
    exe = str(MKDOCS) if MKDOCS.exists() else shutil.which("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([exe, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "dkm" / "index.html").read_text()
    assert "DeepKernelMachine" in api and "latent function" in api  # from the docstrings
    # the docstrings' reST roles and directives are rendered, not printed as text
    for page in (tmp_path / "site" / "api").rglob("index.html"):
        html = page.read_text()
        for role in (":math:", ":class:", ":func:", ":meth:", ".. math::", ".. code-block::"):
            assert role not in html, (page.parent.name, role)
    assert 'class="arithmatex"' in api
    pages = list((tmp_path / "site").rglob("index.html"))
    assert len(pages) >= 15
