"""The quick start from a fresh clone in an empty directory: `make test` and `make demo` pass there on the
text bundled with the package (CI runs the demo half of this through .ci/run)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_make_test_and_make_demo_pass_in_a_fresh_clone():
    subprocess.run([str(ROOT / ".ci" / "fresh-clone"), "--test"], check=True, timeout=3600)
