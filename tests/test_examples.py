"""The examples run and check what they claim (short settings; the committed figures use the defaults)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``examples/<name>`` as a script, importing this checkout's mupkit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)


def test_distributed_example_equals_the_single_process_run(tmp_path):
    """DDP and FSDP2 (world size 2, gloo) loss curves equal the single-process run to 1e-5; the
    example exits non-zero otherwise."""
    done = run_example("distributed.py", "--steps", "4", "--out", str(tmp_path / "d.png"))
    assert done.returncode == 0, done.stdout + done.stderr
    diffs = [float(line.rsplit("= ", 1)[1]) for line in done.stdout.splitlines() if "max |loss" in line]
    assert len(diffs) == 2 and max(diffs) <= 1e-5, done.stdout
    assert "PASS" in done.stdout and (tmp_path / "d.png").stat().st_size > 10_000
