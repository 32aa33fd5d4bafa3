"""Resources of the Triton kernels without a GPU: the offline compile of CI's configurations
(registers, shared memory, spills against sm_80/sm_86/sm_90/gfx90a limits), the run-time
shared-memory pruning with simulated device limits, and the autotuning lists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton backend needs Triton installed")

from stt_kernels.triton import attention, resources  # noqa: E402
from stt_kernels.triton.resources import KB, Case, Usage  # noqa: E402

FLASH = ("_flash_forward", "_flash_backward_dkdv", "_flash_backward_dq")


def _estimate(kernel, config, size, d, t=0):
    return attention.shared_estimate(kernel, config, size, d, t)


@pytest.mark.parametrize("kernel", FLASH)
def test_pruning_keeps_exactly_what_fits_a_99_kb_part(kernel):
    configs = attention.TUNING[kernel].configs("default", "cuda")
    kept = attention.prune_shared(kernel, configs, 4, 128, 0, 99 * KB)
    assert kept == [c for c in configs if _estimate(kernel, c, 4, 128) <= 99 * KB]
    assert 0 < len(kept) < len(configs), "float32 at d = 128 must lose its large blocks on 99 KB, not all"
    # An H100's 227 KB takes every 16-bit default configuration.
    assert attention.prune_shared(kernel, configs, 2, 128, 0, 227 * KB) == configs


def test_no_limit_keeps_everything():
    configs = attention.TUNING["_flash_forward"].configs("full", "cuda")
    assert attention.prune_shared("_flash_forward", configs, 4, 128, 0, None) == configs


def test_nothing_fitting_is_one_error_naming_kernel_and_limit():
    configs = attention.TUNING["_flash_forward"].configs("default", "cuda")
    with pytest.raises(RuntimeError, match=r"_flash_forward: no autotuning configuration fits this GPU's 8 KB"):
        attention.prune_shared("_flash_forward", configs, 4, 128, 0, 8 * KB)


def test_the_autotuner_prunes_by_the_current_device_before_compiling(monkeypatch):
    """The kernels' own early_config_prune asks for the device's limit (simulated: AMD's 64 KB)."""
    monkeypatch.setattr(attention, "_current_shared_limit", lambda: 64 * KB)
    configs = attention.TUNING["_flash_backward_dkdv"].configs("default", "hip")
    prune = attention._flash_backward_dkdv.early_config_prune
    kept = prune(configs, {"N": 4096, "Q": torch.empty(0, dtype=torch.float32)}, BLOCK_D=128)
    assert kept == [c for c in configs if _estimate("_flash_backward_dkdv", c, 4, 128) <= 64 * KB]
    assert kept and len(kept) < len(configs)
    # Short sequences still drop blocks longer than the padded sequence first.
    short = prune(configs, {"N": 20, "Q": torch.empty(0, dtype=torch.bfloat16)}, BLOCK_D=16)
    assert short and all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] <= 32 for c in short)


# (target, device): shared memory per block of the devices each autotuning list runs on.
DEVICES = [("cuda", 163 * KB), ("cuda", 99 * KB), ("cuda", 227 * KB), ("hip", 64 * KB)]


@pytest.mark.parametrize("kernel", FLASH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target, limit", DEVICES, ids=[f"{t}-{limit // KB}KB" for t, limit in DEVICES])
def test_the_largest_head_dim_keeps_a_configuration_on_every_device(monkeypatch, kernel, dtype, target, limit):
    """BLOCK_D = 256 (d = 129..256), a long sequence: the kernel's own pruning leaves a config."""
    monkeypatch.setattr(attention, "_current_shared_limit", lambda: limit)
    monkeypatch.setattr(attention, "_HIP", target == "hip")
    configs = attention.TUNING[kernel].configs("default", target)
    prune = getattr(attention, kernel).early_config_prune
    kept = prune(configs, {"N": 4096, "Q": torch.empty(0, dtype=dtype)}, BLOCK_D=256)
    assert kept and all(attention.fits_shared(kernel, c, dtype.itemsize, 256, 0, limit, target) for c in kept)


def test_amd_estimate_bounds_one_staged_operand_tile():
    """On AMD the tiled kernels' estimate is twice the largest operand tile, where that is lower:
    float32 16 x 16 dK/dV at d = 256 compiled to 16 KB on gfx90a, above 64 KB by the general rule."""
    config = _flash(16, 16)
    assert _estimate("_flash_backward_dkdv", config, 4, 256) > 64 * KB
    amd = attention.shared_estimate("_flash_backward_dkdv", config, 4, 256, 0, "hip")
    assert amd == 2 * 4 * 16 * 256 + 16 * 32
    # A 128 x 32 forward stages less than twice its 128-row tile by the general rule: that one holds.
    tall = _flash(128, 32)
    assert attention.shared_estimate("_flash_forward", tall, 2, 128, 0, "hip") == _estimate(
        "_flash_forward", tall, 2, 128
    )
    packed = triton.Config({"SEQS": 2}, num_warps=4)
    assert attention.shared_estimate("_packed_forward", packed, 2, 64, 32, "hip") == _estimate(
        "_packed_forward", packed, 2, 64, 32
    )


@pytest.mark.parametrize("kernel", FLASH)
@pytest.mark.parametrize("target", ["cuda", "hip"])
def test_every_default_list_ends_with_16_by_16_blocks(kernel, target):
    """The blocks that fit float32 at d = 256 on 99 KB parts and spill nowhere at d = 256
    (offline compiles, benchmarks/RESULTS.md); the tiniest sequences run them alone."""
    configs = attention.TUNING[kernel].configs("default", target)
    assert attention._blocks(configs[-1]) == (16, 16)
    assert _estimate(kernel, configs[-1], 4, 256) <= 99 * KB
    prune = getattr(attention, kernel).early_config_prune
    assert prune(configs, {"N": 9, "Q": torch.empty(0, dtype=torch.float32)}, BLOCK_D=16) == [configs[-1]]


def test_packed_pruning_applies_the_register_budget_then_shared_memory(monkeypatch):
    configs = attention.TUNING["_packed_forward"].configs("default", "cuda")
    prune = attention._packed_forward.early_config_prune
    q = torch.empty(0, dtype=torch.bfloat16)
    monkeypatch.setattr(attention, "_current_shared_limit", lambda: 227 * KB)
    by_budget = prune(configs, {"Q": q}, T_PAD=32, BLOCK_D=128)
    assert sorted(c.kwargs["SEQS"] for c in by_budget) == [1, 2]
    monkeypatch.setattr(attention, "_current_shared_limit", lambda: 32 * KB)
    assert [c.kwargs["SEQS"] for c in prune(configs, {"Q": q}, T_PAD=32, BLOCK_D=128)] == [1]


def test_quick_tune_runs_the_first_default_configuration_that_fits(monkeypatch):
    monkeypatch.setattr(attention, "_INTERPRET", False)
    monkeypatch.setenv("STT_TRITON_QUICK_TUNE", "1")
    configs = attention.TUNING["_flash_forward"].configs("default", "cuda")
    fitting = [c for c in configs if _estimate("_flash_forward", c, 4, 128) <= 99 * KB]
    assert attention.prune_shared("_flash_forward", configs, 4, 128, 0, 99 * KB) == fitting[:1]
    assert fitting[0] is not configs[0], "the list's first entry does not fit here: the test must show the skip"


@pytest.mark.parametrize(
    "env, mode",
    [
        ({}, "default"),
        ({"STT_TRITON_FULL_TUNE": "1"}, "full"),
        ({"STT_TRITON_QUICK_TUNE": "1"}, "quick"),
        ({"STT_TRITON_QUICK_TUNE": "1", "STT_TRITON_FULL_TUNE": "1"}, "quick"),
    ],
)
def test_tuning_mode_from_the_environment(monkeypatch, env, mode):
    monkeypatch.setattr(attention, "_INTERPRET", False)
    for name in ("STT_TRITON_FULL_TUNE", "STT_TRITON_QUICK_TUNE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert attention._mode() == mode


@pytest.mark.parametrize("kernel", list(attention.TUNING))
@pytest.mark.parametrize("target", ["cuda", "hip"])
def test_default_lists_are_short_subsets_of_the_full_ones(kernel, target):
    tuning = attention.TUNING[kernel]
    default, full = tuning.configs("default", target), tuning.configs("full", target)
    assert len(default) <= 5 < len(full)
    assert {str(c) for c in default} <= {str(c) for c in full}
    assert tuning.configs("interpret", target)[0].num_warps == 1


def _case(config, target="sm_80", dtype="float32", d=128, kernel="_flash_forward"):
    return Case(kernel, config, dtype, d, 0, target, True)


def _flash(m, n, warps=4):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=2)


def test_judge_compares_compiled_shared_memory_with_what_pruning_keeps():
    case = _case(_flash(64, 64))  # estimated ~114 KB in float32 at d = 128
    assert 99 * KB < _estimate("_flash_forward", case.config, 4, 128) <= 163 * KB
    fine = resources.judge(case, Usage(200, 0, 112 * KB, 1.0), None)
    assert fine.problems == () and fine.pruned_on == ("sm_86/89",)
    underestimated = resources.judge(case, Usage(200, 0, 170 * KB, 1.0), None)
    assert len(underestimated.problems) == 1
    assert "170.0 KB shared > 163 KB on sm_80, yet run-time pruning keeps it" in underestimated.problems[0]


def test_judge_checks_registers_per_thread_and_per_block():
    assert resources.judge(_case(_flash(64, 64, 8)), Usage(255, 0, 0, 1.0), None).problems == ()
    assert "256 registers > 255" in resources.judge(_case(_flash(64, 64)), Usage(256, 0, 0, 1.0), None).problems[0]
    wide = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=16, num_stages=2)
    assert "x 512 threads > 65536" in resources.judge(_case(wide), Usage(200, 0, 0, 1.0), None).problems[0]
    amd = _case(_flash(32, 32), target="gfx90a")
    assert resources.judge(amd, Usage(512, 0, 0, 1.0), None).problems == ()
    assert resources.judge(amd, Usage(513, 0, 0, 1.0), None).problems


def test_a_shape_needs_one_default_that_fits_without_spilling():
    spilling = resources.judge(_case(_flash(32, 32), dtype="bfloat16"), Usage(255, 400, 18 * KB, 1.0), None)
    pruned = resources.judge(_case(_flash(64, 64), dtype="bfloat16"), Usage(200, 0, 80 * KB, 1.0), None)
    assert pruned.pruned_on == ()  # bf16 64 x 64 is estimated under 99 KB
    assert resources.empty_choices([spilling]) and not resources.empty_choices([spilling, pruned])
    float32 = resources.judge(_case(_flash(64, 64)), Usage(200, 0, 112 * KB, 1.0), None)
    assert resources.empty_choices([float32]) == [
        "_flash_forward d=128 t=0 float32 on sm_86/89: no default configuration fits without spilling"
    ]


def test_compile_failures_are_reported_not_raised():
    result = resources.judge(_case(_flash(64, 64)), None, "CompilationError: boom")
    assert result.problems == ("compile failed: CompilationError: boom",)


def test_amd_usage_reads_vgprs_and_spills():
    text = (
        "; ScratchSize: 24\n    .sgpr_count:     66\n    .sgpr_spill_count: 1\n    .vgpr_count:     124\n"
        "    .vgpr_spill_count: 2\n"
    )
    assert resources._amd_usage(text) == (124, 24)
    assert resources._amd_usage(text.replace("ScratchSize: 24", "ScratchSize: 0")) == (124, 12)


def test_cli_refuses_the_interpreter_and_an_existing_output(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        resources.main(["--out", str(tmp_path / "t.md")])  # conftest set TRITON_INTERPRET=1 here
    assert exc.value.code == 2 and "TRITON_INTERPRET=1" in capsys.readouterr().err
    existing = tmp_path / "table.md"
    existing.write_text("keep me")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # main() reads it at call time; it refuses before compiling
    with pytest.raises(SystemExit) as exc:
        resources.main(["--out", str(existing)])
    assert exc.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_text() == "keep me"
    with pytest.raises(SystemExit) as exc:
        resources.main(["--jobs", "0"])
    assert exc.value.code == 2 and "--jobs must be at least 1, got 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    """CI's configurations compiled offline, with an empty Triton cache (the time CI pays)."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton has no bundled cuobjdump")
    folder = tmp_path_factory.mktemp("triton-resources")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(folder / "cache")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stt_kernels.triton.resources",
            "--jobs",
            str(min(2, os.cpu_count() or 1)),
            "--out",
            str(folder / "table.md"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done, folder


def test_ci_configurations_fit_every_target(ci_run):
    done, folder = ci_run
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line.split(" | ") for line in (folder / "table.md").read_text().splitlines()[2:]]
    seen = {(row[0].strip("| "), row[5]) for row in rows}
    for targets, kernels, _ in resources.CI_GROUPS:
        assert {(k, t) for k in kernels for t in targets} <= seen
    assert len(rows) == len(resources.ci_cases())
    for row in rows:
        assert row[-1].strip(" |") == "ok" or row[-1].startswith("pruned on"), row


def test_deformable_atomics_are_relaxed(ci_run):
    """grad_x and grad_weight only accumulate: their atomics need no acquire/release order."""
    _, folder = ci_run
    for kernel in ("_grad_input_kernel", "_grad_weight_kernel"):
        ttirs = list((folder / "cache").rglob(f"{kernel}.ttir"))
        assert ttirs, f"no TTIR of {kernel} in the cache"
        for ttir in ttirs:
            ops = re.findall(r"tt\.atomic_rmw fadd, (\w+)", ttir.read_text())
            assert ops and set(ops) == {"relaxed"}, (ttir, ops)
