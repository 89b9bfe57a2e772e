"""The GPU acceptance script cannot rot: its CPU dry run (every check, at tiny sizes) passes here."""
import json
import subprocess
import sys

import pytest
from cli_utils import ENV, ROOT

pytestmark = pytest.mark.ray


def test_the_gpu_acceptance_script_passes_its_cpu_dry_run(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--cpu-dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = {c["check"]: c["status"] for c in json.loads((tmp_path / "results.json").read_text())["checks"]}
    assert checks.pop("b) ioisray train IOIS, 2 workers") == "SKIP"  # needs 2 GPUs, and says so
    assert checks and set(checks.values()) == {"PASS"}
    assert {"a) ioisray train IOIS, 1 worker(s)", "c) sampler tiny bf16 + compile",
            "d) resnet10t training at 32, bf16"} <= set(checks)
