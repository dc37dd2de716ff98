"""Coverage-guided fuzzing with atheris (libFuzzer) of the AGI parser, the CRM answer parser
and the node loader (targets in tests/fuzz/atheris_targets.py).

Each target runs in its own process (libFuzzer exits the process when done), seeded with
tests/corpus/<target>/; the inputs it discovers go to a temporary directory, and a crash
fails the test with libFuzzer's report. The default form is a short run per target; the
`slow` form runs each for a minute. Inputs worth keeping are copied into the corpus by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_fuzz_agi import long_form_wanted

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "tests" / "fuzz" / "atheris_targets.py"
TARGETS = ["agi", "crm", "nodes"]


def fuzz(target: str, tmp_path: Path, *flags: str) -> str:
    found = tmp_path / "found"
    found.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'services'}:{ROOT}"}
    process = subprocess.run(
        [
            sys.executable, str(HARNESS), target, *flags,
            f"-artifact_prefix={tmp_path}/", "-print_final_stats=1",
            str(found), str(ROOT / "tests" / "corpus" / target),
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = process.stdout + process.stderr
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert not crashes, f"{crashes}\n{output[-4000:]}"
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.parametrize("target", TARGETS)
def test_short_atheris_run(target: str, tmp_path: Path) -> None:
    """3,000 coverage-guided inputs per target, seeded with the corpus: no crash."""
    output = fuzz(target, tmp_path, "-runs=3000")
    assert "Done 3000 runs" in output


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", TARGETS)
def test_long_atheris_run(target: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A minute per target (marker `slow`; skipped unless `-m slow` or CALLERID_TEST_SLOW=1)."""
    long_form_wanted(request.config)
    fuzz(target, tmp_path, "-max_total_time=60")
