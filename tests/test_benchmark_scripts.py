"""The benchmark scripts' own logic, without running a benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_llamacpp_bench_is_skipped_with_a_reason_without_llama_cpp(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llamacpp_bench.py"), "--bundle", str(tmp_path),
                           "--llama-cpp", str(tmp_path / "absent")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout and "--sdist" in proc.stdout
    assert not (tmp_path / "absent").exists()  # nothing created for a skipped run


def test_perf_table_compares_against_llama_cpps_fastest_setting_that_ran():
    from perf_table import llamacpp_rows

    llama = {"Q4_0 prefill 300": {"repack (default)": None, "repack, -ub 1": 12.0, "--repack 0": 24.0},
             "Q4_0 decode 128 @0": {"repack (default)": 9.0, "--repack 0": 3.5},
             "Q4_0 decode 128 @300": {"repack (default)": None, "repack, -ub 1": 8.0, "--repack 0": 3.4}}
    ours = {"qwen3vl-compile INT4 block 32": {"prefill": [30.0, 36.0], "decode@0": [9.0], "decode@300": [6.0]},
            "qwen3vl-compile vision fp32": {"vision": [2.0]}}
    rows = llamacpp_rows({"llama": llama, "ours": ours, "mtmd_s": [3.0, 3.4]})
    assert rows[0][1] == "llama.cpp Q4_0 24.00 tok/s (--repack 0)" and rows[0][2] == "block 32: 33.00 tok/s = 1.38x"
    assert rows[1][2].endswith("= 1.00x") and rows[2][1] == "llama.cpp Q4_0 8.00 tok/s (repack, -ub 1)"
    assert rows[2][2].endswith("= 0.75x")
    assert rows[3][1] == "llama.cpp f16 mmproj 3.20 s" and rows[3][2] == "fp32 2.00 s = 1.60x"
