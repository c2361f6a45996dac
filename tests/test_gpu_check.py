"""benchmarks/gpu_check.sh (issue 15): the GPU worker path end to end, here on its CPU fallback.

The script is what an integrator runs on a GPU machine; on this CPU-only
machine it must still run the same path (`crackq run` with a `--device gpu`
ONNX worker, which falls back to the CPU provider), say so, and report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from benchmarks.common import REPO


def test_gpu_check_script_runs_its_cpu_fallback_end_to_end(tmp_path):
    env = {**os.environ, "USE_CURRENT_PYTHON": "1", "PYTHON": sys.executable, "N": "50",
           "OUT": str(tmp_path / "gpu-check"), "BATCH": "16", "DECODE_THREADS": "2",
           # no nvidia-smi on PATH, whatever this machine has
           "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                   if not shutil.which("nvidia-smi", path=p))}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "no NVIDIA GPU found" in out and "CPU FALLBACK" in out
    assert "serves fp32 crackq_mobilenetv2.onnx on CPUExecutionProvider" in out
    assert "fp32: " in out and "img/s end to end (50 images in" in out and "0 error records" in out
    results = (tmp_path / "gpu-check" / "results-fp32.csv").read_text().splitlines()
    assert len(results) == 51  # header + one record per image


def test_gpu_check_script_says_what_failed(tmp_path):
    """A step that fails names itself and its log (here: a folder of images that does not exist)."""
    env = {**os.environ, "USE_CURRENT_PYTHON": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "o")}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "missing")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "FAILED:" in proc.stdout and "is not a folder" in proc.stdout
