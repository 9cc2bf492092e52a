"""benchmarks/bench_gpu.py: it exits cleanly without CUDA, and its code paths run on the CPU (tiny model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run the whole GPU benchmark")
def test_without_cuda_it_says_so_and_exits_0(capsys):
    assert bench_gpu.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_tiny_cpu_run_measures_every_variant_and_finds_the_documented_host_reads(capsys):
    args = ["--device", "cpu", "--tiny", "--rounds", "2", "--warmup", "0", "--sync-steps", "4", "--sync-warmup", "3"]
    assert bench_gpu.main(args) == 0
    out = capsys.readouterr().out
    for row in ("bare", "torch clip", "guard", "bare fused", "guard fused, forensics off", "guard fused, compile=True"):
        assert f"\n{row} " in out
    assert "Guard overhead / torch clip_grad_norm_ overhead" in out
    sync_lines = [line for line in out.splitlines() if "checked steps" in line]
    assert len(sync_lines) >= 2 and all(line.endswith("-> as documented") for line in sync_lines), sync_lines
    assert "grad_stats" in out and "of the copy's bandwidth" in out
    launches = {line.split(":")[0].strip(): int(line.split(":")[1]) for line in out.split("in one guarded step")[1]
                .split("==")[0].splitlines()[1:] if ":" in line}
    assert launches["fused AdamW, compile=True"] <= 25 < launches["fused AdamW"], launches
    assert "the same records" in out and "'grad_spike'" in out and "'nonfinite_grad'" in out
