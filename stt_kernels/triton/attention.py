"""Split attention in Triton: flash-style forward and backward over strided 5-d views.

Every tensor is a ``(B, Z, N, heads, d)`` view (spatial: ``Z = T, N = H*W``; temporal:
``Z = H*W, N = T``) read and written in place through its strides, so the views of the
packed ``(B, T, H, W, 3, heads, d)`` projection need no copies. Two kernel families:

* tiled flash attention (any ``N``): one program per (query block, sequence) in the
  forward and the dQ pass, one per (key block, sequence) in the dK/dV pass;
* packed short sequences (the temporal case; for d <= 64 up to N = 64 forward and 32
  backward, see the register budgets): several whole sequences per program, the
  ``N x N`` score tile of each held on chip, forward and the whole backward in one pass
  each.

The sequences (``B * Z * heads``, up to ~10^6 for temporal attention at full resolution)
always run along grid axis 0; axes 1 and 2 are capped at 65,535 blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..backend import CAPABILITIES
from ..ops.kernels import Kernels, attention_kernels
from .launch import on_tensor_device

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_HIP = torch.version.hip is not None and not _INTERPRET

_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))

# Register budget of the packed kernels, in units of T_PAD * (T_PAD + BLOCK_D) (a program's
# score tiles plus its operand tiles): a sequence whose own tiles exceed it goes to the
# tiled kernels, and SEQS is pruned to stay within twice it. Set from ptxas reports for
# sm_80/sm_90 in bf16: at 64 x (64 + 128) the forward spills ~1.4 KB, at 128 x (128 + 32)
# ~15 KB; the backward, which also holds o, dO and four score-sized tiles, spills from
# 64 x (64 + 32) on, and by tens of KB at 64 x (64 + 64).
_PACKED_BUDGET_FORWARD = 8192
_PACKED_BUDGET_BACKWARD = 4096

# tl.dot needs K >= 16 for 16-bit inputs on NVIDIA (the reduction runs over d for
# q k^T and over the sequence for p v), so no tile dimension goes below 16.
_MIN_TILE = 16

_SUPPORTED_DTYPES = CAPABILITIES["triton"].dtypes["attention"]


def refuse_interpreted_bfloat16(dtype: torch.dtype, op: str, advice: str) -> None:
    """A TypeError for bfloat16 under Triton's interpreter, whose bfloat16 ``tl.dot`` is wrong
    by ~1e9 (measured; its float16 and float32 products are right)."""
    if _INTERPRET and dtype == torch.bfloat16:
        raise TypeError(
            f"the triton {op} kernels refuse bfloat16 under TRITON_INTERPRET=1: Triton's "
            f"interpreter computes bfloat16 tl.dot wrongly (errors of ~1e9); {advice}"
        )


def _bucket(count: int) -> int:
    """``count`` rounded up to a power of 2: an autotuning key that tells a tiny warm-up input
    from the real one without a tuning run per exact size."""
    return triton.next_power_of_2(max(1, count))


def _tile(n: int) -> int:
    return max(_MIN_TILE, triton.next_power_of_2(n))


def _mode() -> str:
    # The interpreter runs one program at a time on the CPU: tuning there costs minutes and
    # measures nothing, so it gets a single small configuration.
    if _INTERPRET:
        return "interpret"
    if os.environ.get("STT_TRITON_QUICK_TUNE") == "1":
        return "quick"
    return "full" if os.environ.get("STT_TRITON_FULL_TUNE") == "1" else "default"


@dataclasses.dataclass(frozen=True)
class Tuning:
    """A kernel's autotuning lists per target ("cuda", "hip"): the whole search space
    (``STT_TRITON_FULL_TUNE=1``), the short default list in order of preference (under
    ``STT_TRITON_QUICK_TUNE=1`` its first entry that fits the device runs untuned), and the
    interpreter's one configuration."""

    full: dict[str, list[triton.Config]]
    default: dict[str, list[triton.Config]]
    interpret: dict

    def configs(self, mode: str, target: str) -> list[triton.Config]:
        """The list autotuning searches in ``mode`` (see :func:`_mode`) on ``target``."""
        if mode == "interpret":
            return [triton.Config(self.interpret, num_warps=1, num_stages=1)]
        return (self.full if mode == "full" else self.default)[target]


def _flash_space(block_m: tuple[int, ...], block_n: tuple[int, ...]) -> dict[str, list[triton.Config]]:
    # A100/H100: 64-128 row blocks with 2-4 pipeline stages (cp.async / TMA-friendly).
    cuda = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in block_m
        for n in block_n
        for w in (4, 8)
        for s in (2, 3, 4)
    ]
    # MI250X: 1-2 stages, as AMD's own flash-attention configs use; waves_per_eu trades
    # registers per wave for occupancy on CDNA's 512-VGPR budget.
    hip = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "waves_per_eu": wpe}, num_warps=w, num_stages=s)
        for m in block_m
        for n in block_n
        for w in (4, 8)
        for s in (1, 2)
        for wpe in (0, 2)
    ]
    return {"cuda": cuda, "hip": hip}


def _packed_space() -> dict[str, list[triton.Config]]:
    seqs = (1, 2, 4, 8, 16)
    # No loop to pipeline: the stage count does not matter, the warps per program and the
    # number of sequences sharing them do.
    cuda = [triton.Config({"SEQS": s}, num_warps=w, num_stages=1) for s in seqs for w in (2, 4, 8)]
    hip = [
        triton.Config({"SEQS": s, "waves_per_eu": wpe}, num_warps=w, num_stages=1)
        for s in seqs
        for w in (4, 8)
        for wpe in (0, 2)
    ]
    return {"cuda": cuda, "hip": hip}


def _flash_list(blocks: list[tuple[int, int, int]]) -> dict[str, list[triton.Config]]:
    """(BLOCK_M, BLOCK_N, warps) in order of preference, for both targets."""
    return {
        "cuda": [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=2) for m, n, w in blocks],
        "hip": [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "waves_per_eu": 0}, num_warps=w, num_stages=1)
            for m, n, w in blocks
        ],
    }


def _packed_list(seqs: tuple[int, ...]) -> dict[str, list[triton.Config]]:
    return {
        "cuda": [triton.Config({"SEQS": s}, num_warps=4, num_stages=1) for s in seqs],
        "hip": [triton.Config({"SEQS": s, "waves_per_eu": 0}, num_warps=4, num_stages=1) for s in seqs],
    }


def _union(*spaces: dict[str, list[triton.Config]]) -> dict[str, list[triton.Config]]:
    out: dict[str, list[triton.Config]] = {}
    for target in ("cuda", "hip"):
        seen: dict[str, triton.Config] = {}
        for space in spaces:
            for config in space[target]:
                seen.setdefault(str(config), config)
        out[target] = list(seen.values())
    return out


# The default lists, read from the offline compiles (benchmarks/RESULTS.md, "Triton resources"):
# * one stage count: the loads are not multi-buffered, so shared memory and registers came out
#   the same at 2, 3 and 4 stages (all 36 forward configurations, bf16, d = 64, sm_90), and the
#   36-config lists compiled each kernel three times over;
# * 8 warps for 128-row blocks, and for 64 x 64 ones: at 4 warps the first sit at 255 registers
#   already at d = 64 (bf16, sm_90), the second spill 500-800 B per thread at d = 128 (sm_80);
# * no 128 x 128 forward or 64 x 128 dK/dV blocks: at d = 128 in bf16 they spill kilobytes per
#   thread (7 KB for the forward on sm_80);
# * small fallbacks last: float32 IEEE products stage every operand through shared memory
#   (72-256 KB at d = 128 for 64-128 row blocks, sm_80), so 99 KB parts (sm_86/89) and AMD's
#   64 KB need the 32- and 16-row blocks, which also never spill; the run-time pruning keeps
#   only what fits the device;
# * 16 x 16 blocks last of all: at d = 256 (BLOCK_D 256) in float32 nothing larger fits 99 KB
#   parts, and in bf16 on gfx90a the 32 x 32 forward spills 176 B per thread; 16 x 16 blocks
#   spill nothing at d = 256 (bf16 on sm_80, sm_90, gfx90a; float32 on sm_80, gfx90a).
TUNING: dict[str, Tuning] = {
    "_flash_forward": Tuning(
        _union(_flash_space((64, 128), (32, 64, 128)), _flash_list([(32, 32, 4), (16, 16, 4)])),
        _flash_list([(128, 64, 8), (64, 64, 8), (64, 32, 4), (32, 32, 4), (16, 16, 4)]),
        {"BLOCK_M": 16, "BLOCK_N": 16},
    ),
    "_flash_backward_dkdv": Tuning(
        _union(_flash_space((32, 64, 128), (64, 128)), _flash_list([(16, 32, 4), (16, 16, 4)])),
        _flash_list([(32, 64, 4), (64, 64, 8), (16, 32, 4), (16, 16, 4)]),
        {"BLOCK_M": 16, "BLOCK_N": 16},
    ),
    "_flash_backward_dq": Tuning(
        _union(_flash_space((64, 128), (32, 64, 128)), _flash_list([(32, 16, 4), (16, 16, 4)])),
        _flash_list([(64, 64, 8), (128, 64, 8), (64, 32, 4), (32, 16, 4), (16, 16, 4)]),
        {"BLOCK_M": 16, "BLOCK_N": 16},
    ),
    # The register budget prunes SEQS to what a shape affords; warps do not change what fits.
    "_packed_forward": Tuning(
        _union(_packed_space(), _packed_list((2, 4, 8, 16, 1))), _packed_list((2, 4, 8, 16, 1)), {"SEQS": 2}
    ),
    "_packed_backward": Tuning(
        _union(_packed_space(), _packed_list((2, 4, 8, 16, 1))), _packed_list((2, 4, 8, 16, 1)), {"SEQS": 2}
    ),
}


def _configs(kernel: str) -> list[triton.Config]:
    return TUNING[kernel].configs(_mode(), "hip" if _HIP else "cuda")


def _blocks(config: triton.Config) -> tuple[int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]


def _prune_flash(kernel: str):
    def prune(configs, named_args, **kwargs):
        # Blocks longer than the padded sequence only add masked work; keep the configs that
        # fit, or the smallest blocks if none does. Then drop those the device's shared memory
        # cannot hold, so no tuning run compiles a kernel that cannot launch.
        n = _tile(named_args["N"])
        fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= n and c.kwargs["BLOCK_N"] <= n]
        if not fitting:
            smallest = min(_blocks(c) for c in configs)
            fitting = [c for c in configs if _blocks(c) == smallest]
        return prune_shared(
            kernel, fitting, named_args["Q"].element_size(), kwargs["BLOCK_D"], 0, _current_shared_limit(), _target()
        )

    return prune


def _packed_fits(n: int, d: int, budget: int) -> bool:
    t = _tile(n)
    return t * (t + _tile(d)) <= budget


def packed_budget(kernel: str) -> int:
    """The register budget of packed kernel ``kernel`` (``_packed_forward`` or ``_packed_backward``)."""
    return _PACKED_BUDGET_FORWARD if kernel == "_packed_forward" else _PACKED_BUDGET_BACKWARD


def _tiles(kernel: str, config: triton.Config, block_d: int, t_pad: int) -> tuple[int, int, int]:
    """Elements of a program's dot operand tiles (q, k, v, dO sized) and of its score-sized
    tiles, and its rows (query rows + key rows)."""
    if kernel.startswith("_packed"):
        rows = config.kwargs["SEQS"] * t_pad
        operands, scores = rows * block_d, rows * t_pad
        if kernel == "_packed_forward":
            return 3 * operands, scores, 2 * rows
        return 4 * operands, 2 * scores, 2 * rows
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if kernel == "_flash_forward":
        return m * block_d + 2 * n * block_d, m * n, m + n
    # dK/dV and dQ: q and dO of the query block, k and v of the key block; p and dS.
    return 2 * m * block_d + 2 * n * block_d, 2 * m * n, m + n


def _target() -> str:
    return "hip" if _HIP else "cuda"


def shared_estimate(
    kernel: str, config: triton.Config, element_size: int, block_d: int, t_pad: int = 0, target: str = "cuda"
) -> int:
    """Upper bound on the shared memory (bytes) ``kernel`` needs with ``config`` for inputs of
    ``element_size`` bytes, padded head dim ``block_d`` and (packed kernels) padded length ``t_pad``,
    compiled for ``target`` ("cuda" or "hip").

    Every dot operand is staged through shared memory once (the loads are not multi-buffered:
    the compiled usage does not change with num_stages), and so are the score-sized operands
    (p, dS): in float32 the IEEE products run on FMA units with both operands from shared
    memory, 16-bit tiles at their own size; row reductions (max, sum) take a few words per
    row. AMD's compiles of the tiled kernels stage one operand tile at a time: every one
    compiled for gfx90a (bf16 at d = 128, float32 at d = 256) used max(BLOCK_M, BLOCK_N) x
    BLOCK_D elements exactly, so twice that bounds them there. Checked against the compiled
    kernels by ``stt_kernels.triton.resources`` (CI)."""
    operands, scores, rows = _tiles(kernel, config, block_d, t_pad)
    estimate = element_size * (operands + scores) + 16 * rows
    if target == "hip" and not kernel.startswith("_packed"):
        staged = 2 * element_size * max(_blocks(config)) * block_d + 16 * rows
        estimate = min(estimate, staged)
    return estimate


def fits_shared(
    kernel: str,
    config: triton.Config,
    element_size: int,
    block_d: int,
    t_pad: int,
    limit: int,
    target: str = "cuda",
) -> bool:
    """Whether ``config`` of ``kernel`` fits a ``target`` device with ``limit`` bytes of shared memory per block."""
    return shared_estimate(kernel, config, element_size, block_d, t_pad, target) <= limit


@functools.cache
def _device_shared_limit(device: int) -> int:
    """Opt-in shared memory per block of GPU ``device``: what Triton checks a launch against."""
    return triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]


def _current_shared_limit() -> Optional[int]:
    # The interpreter has no shared memory to run out of.
    return None if _INTERPRET else _device_shared_limit(torch.cuda.current_device())


def prune_shared(
    kernel: str,
    configs: list[triton.Config],
    element_size: int,
    block_d: int,
    t_pad: int,
    limit: Optional[int],
    target: str = "cuda",
) -> list[triton.Config]:
    """The configs of ``kernel`` that fit ``limit`` bytes of shared memory (all if ``limit`` is None;
    the first of them under ``STT_TRITON_QUICK_TUNE=1``). None fitting is an error naming the kernel and the limit, before any compile."""
    if limit is None:
        return configs
    fitting = [c for c in configs if fits_shared(kernel, c, element_size, block_d, t_pad, limit, target)]
    if fitting and _mode() == "quick":
        # A first GPU session (make gpu-check) cannot afford minutes of tuning per sequence
        # length: the default list's first configuration that fits.
        return fitting[:1]
    if not fitting:
        smallest = min(shared_estimate(kernel, c, element_size, block_d, t_pad, target) for c in configs)
        raise RuntimeError(
            f"triton {kernel}: no autotuning configuration fits this GPU's {limit // 1024} KB of "
            f"shared memory per block (the smallest needs ~{smallest // 1024} KB at head dim "
            f"{block_d}); use backend='cuda'"
        )
    return fitting


def _prune_packed(kernel: str):
    budget = packed_budget(kernel)

    def prune(configs, named_args, **kwargs):
        # A program's R = SEQS * T rows keep their score tiles (R x T, fp32) and operand
        # tiles (R x d) in registers; past the budget spilling costs more than the extra
        # sequences save.
        t, d = kwargs["T_PAD"], kwargs["BLOCK_D"]
        fitting = [c for c in configs if c.kwargs["SEQS"] * t <= 256 and c.kwargs["SEQS"] * t * (t + d) <= 2 * budget]
        fitting = fitting or [c for c in configs if c.kwargs["SEQS"] == 1]
        if "Q" not in named_args:  # the offline resource check asks for the shape pruning alone
            return fitting
        return prune_shared(kernel, fitting, named_args["Q"].element_size(), d, t, _current_shared_limit(), _target())

    return prune


# ---------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _sequence(seq, Z, HEADS):
    """Sequence index -> (b, z, head); heads vary fastest, then z, then b."""
    h = seq % HEADS
    bz = seq // HEADS
    return bz // Z, bz % Z, h


@triton.jit
def _offset(b, z, h, stride_b, stride_z, stride_h):
    # int64: a packed projection at full resolution passes 2^31 elements.
    return b.to(tl.int64) * stride_b + z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h


# ---------------------------------------------------------------------------------------
# Tiled flash attention


@triton.jit
def _block(N, BLOCK: tl.constexpr, Z, HEADS):
    """This program's sequence, its (b, z, head) and its block of BLOCK rows: the blocks of one
    sequence are neighbours in launch order, so they share its other operands in L2."""
    blocks = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    seq = pid // blocks
    b, z, h = _sequence(seq, Z, HEADS)
    return seq, b, z, h, (pid % blocks) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _rows(ptr, b, z, h, offs, offs_d, st):
    """Pointers of the (rows ``offs``, head dims ``offs_d``) tile of sequence (b, z, h) of a
    (B, Z, N, heads, d) view with strides ``st``."""
    return ptr + _offset(b, z, h, st[0], st[1], st[3]) + offs.to(tl.int64)[:, None] * st[2] + offs_d[None, :] * st[4]


@triton.jit
def _lse_rows(ptr, b, z, h, offs, st):
    """Pointers of rows ``offs`` of sequence (b, z, h) of the (B, Z, heads, N) lse."""
    return ptr + _offset(b, z, h, st[0], st[1], st[2]) + offs.to(tl.int64) * st[3]


@triton.autotune(
    configs=_configs("_flash_forward"),
    key=["N", "BLOCK_D"],
    prune_configs_by={"early_config_prune": _prune_flash("_flash_forward")},
)
@triton.jit
def _flash_forward(
    Q,
    K,
    V,
    OUT,
    LSE,
    sq,
    sk,
    sv,
    so,
    sl,
    Z,
    HEADS,
    N,
    D,
    qk_scale,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    _, b, z, h, offs_m = _block(N, BLOCK_M, Z, HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = (offs_m < N)[:, None] & d_ok[None, :]
    q = tl.load(_rows(Q, b, z, h, offs_m, offs_d, sq), mask=q_mask, other=0.0)

    # Online softmax in base 2 (qk_scale carries log2 e): m_i the running row max,
    # l_i the running row sum, acc the unnormalised output.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < N)[:, None] & d_ok[None, :]
        k = tl.load(_rows(K, b, z, h, offs_n, offs_d, sk), mask=kv_mask, other=0.0)
        v = tl.load(_rows(V, b, z, h, offs_n, offs_d, sv), mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((offs_n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose scores so far are all -inf (an infinite q or k) has m_new = -inf, and
        # -inf - -inf would make it NaN; shifted by 0 its p and alpha are 0, so it ends as
        # plain softmax does: finite once a finite score comes, 0 / 0 = NaN if none does.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(_rows(OUT, b, z, h, offs_m, offs_d, so), acc.to(OUT.dtype.element_ty), mask=q_mask)
    tl.store(_lse_rows(LSE, b, z, h, offs_m, sl), (m_i + tl.log2(l_i)) * _LN2, mask=offs_m < N)


@triton.jit
def _flash_delta(
    OUT,
    DO,
    DELTA,
    so,
    sg,
    Z,
    HEADS,
    N,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """DELTA[seq, n] = rowsum(dO * O): the softmax-backward term shared by dQ and dK."""
    seq, b, z, h, offs_m = _block(N, BLOCK_M, Z, HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    o = tl.load(_rows(OUT, b, z, h, offs_m, offs_d, so), mask=mask, other=0.0)
    do = tl.load(_rows(DO, b, z, h, offs_m, offs_d, sg), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + seq.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, seq, b, z, h, offs_m, offs_d, d_ok, N, sq, sg, sl):
    """q, dO, lse (base 2) and delta of the query rows ``offs_m``: what both backward passes
    read per query block. lse = +inf on padded rows makes their p exactly 0."""
    m_ok = offs_m < N
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(_rows(Q, b, z, h, offs_m, offs_d, sq), mask=q_mask, other=0.0)
    do = tl.load(_rows(DO, b, z, h, offs_m, offs_d, sg), mask=q_mask, other=0.0)
    lse2 = tl.load(_lse_rows(LSE, b, z, h, offs_m, sl), mask=m_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + seq.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    return q, do, lse2, delta, q_mask


@triton.jit
def _key_rows(K, V, b, z, h, offs_n, offs_d, d_ok, N, sk, sv):
    """k and v of the key rows ``offs_n`` (padded rows read as zero vectors)."""
    kv_mask = (offs_n < N)[:, None] & d_ok[None, :]
    k = tl.load(_rows(K, b, z, h, offs_n, offs_d, sk), mask=kv_mask, other=0.0)
    v = tl.load(_rows(V, b, z, h, offs_n, offs_d, sv), mask=kv_mask, other=0.0)
    return k, v, kv_mask


@triton.autotune(
    configs=_configs("_flash_backward_dkdv"),
    key=["N", "BLOCK_D"],
    prune_configs_by={"early_config_prune": _prune_flash("_flash_backward_dkdv")},
)
@triton.jit
def _flash_backward_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    sq,
    sk,
    sv,
    sg,
    sl,
    sdk,
    sdv,
    Z,
    HEADS,
    N,
    D,
    scale,
    qk_scale,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block, accumulated over all query blocks (no atomics)."""
    seq, b, z, h, offs_n = _block(N, BLOCK_N, Z, HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k, v, kv_mask = _key_rows(K, V, b, z, h, offs_n, offs_d, d_ok, N, sk, sv)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse2, delta, _ = _query_rows(Q, DO, LSE, DELTA, seq, b, z, h, offs_m, offs_d, d_ok, N, sq, sg, sl)
        # Transposed tiles (keys x queries) so that dV and dK come out without transposing them.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        # Padded keys (zero vectors) score 0, and exp2(0 - lse) overflows when every real
        # score is far below 0; -inf keeps their rows free of inf and NaN.
        p_t = tl.exp2(tl.where((offs_n < N)[:, None], s_t, float("-inf")) - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    tl.store(_rows(DK, b, z, h, offs_n, offs_d, sdk), (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_rows(DV, b, z, h, offs_n, offs_d, sdv), dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(
    configs=_configs("_flash_backward_dq"),
    key=["N", "BLOCK_D"],
    prune_configs_by={"early_config_prune": _prune_flash("_flash_backward_dq")},
)
@triton.jit
def _flash_backward_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    sq,
    sk,
    sv,
    sg,
    sl,
    sdq,
    Z,
    HEADS,
    N,
    D,
    scale,
    qk_scale,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ of one query block, accumulated over all key blocks (no atomics)."""
    seq, b, z, h, offs_m = _block(N, BLOCK_M, Z, HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q, do, lse2, delta, q_mask = _query_rows(Q, DO, LSE, DELTA, seq, b, z, h, offs_m, offs_d, d_ok, N, sq, sg, sl)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, _ = _key_rows(K, V, b, z, h, offs_n, offs_d, d_ok, N, sk, sv)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # Padded keys (zero vectors) score 0, and exp2(0 - lse) overflows when every real
        # score is far below 0, which inf * 0 would turn into NaN in dQ.
        p = tl.exp2(tl.where((offs_n < N)[None, :], s, float("-inf")) - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(_rows(DQ, b, z, h, offs_m, offs_d, sdq), (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------
# Packed short sequences: SEQS whole sequences per program, batched (3-d) tl.dot.


@triton.jit
def _packed_pointers(ptr, seq, seq_ok, offs_t, offs_d, T, D, Z, HEADS, st):
    """Pointers and mask of a (SEQS, T_PAD, BLOCK_D) tile, one sequence per leading index, of a
    (B, Z, N, heads, d) view with strides ``st``."""
    b, z, h = _sequence(seq, Z, HEADS)
    base = _offset(b, z, h, st[0], st[1], st[3])
    ptrs = ptr + base[:, None, None] + offs_t.to(tl.int64)[None, :, None] * st[2] + offs_d[None, None, :] * st[4]
    mask = seq_ok[:, None, None] & (offs_t < T)[None, :, None] & (offs_d < D)[None, None, :]
    return ptrs, mask


@triton.jit
def _packed_block(NSEQ, SEQS: tl.constexpr, T_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's SEQS sequences (and which exist), and the row and head-dim offsets."""
    seq = tl.program_id(0) * SEQS + tl.arange(0, SEQS)
    return seq, seq < NSEQ, tl.arange(0, T_PAD), tl.arange(0, BLOCK_D)


@triton.jit
def _packed_load(ptr, seq, seq_ok, offs_t, offs_d, T, D, Z, HEADS, st):
    """A (SEQS, T_PAD, BLOCK_D) tile (padding reads as zeros) and its mask."""
    ptrs, mask = _packed_pointers(ptr, seq, seq_ok, offs_t, offs_d, T, D, Z, HEADS, st)
    return tl.load(ptrs, mask=mask, other=0.0), mask


@triton.jit
def _packed_lse_pointers(ptr, seq, seq_ok, offs_t, T, Z, HEADS, st):
    b, z, h = _sequence(seq, Z, HEADS)
    ptrs = ptr + _offset(b, z, h, st[0], st[1], st[2])[:, None] + offs_t.to(tl.int64)[None, :] * st[3]
    return ptrs, seq_ok[:, None] & (offs_t < T)[None, :]


@triton.autotune(
    configs=_configs("_packed_forward"),
    key=["T_PAD", "BLOCK_D", "NSEQ_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_packed("_packed_forward")},
)
@triton.jit
def _packed_forward(
    Q,
    K,
    V,
    OUT,
    LSE,
    sq,
    sk,
    sv,
    so,
    sl,
    NSEQ,
    Z,
    HEADS,
    N,
    D,
    qk_scale,
    NSEQ_BUCKET,  # tuning key only: the best sequences per program depends on how many there are
    T_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    SEQS: tl.constexpr,
):
    seq, seq_ok, offs_t, offs_d = _packed_block(NSEQ, SEQS, T_PAD, BLOCK_D)
    q, mask = _packed_load(Q, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, sq)
    k, _ = _packed_load(K, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, sk)
    v, _ = _packed_load(V, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, sv)

    # Batched (SEQS, T, D) tiles: the transposes name their axes (Triton's default is 2-D only).
    s = tl.dot(q, tl.trans(k, 0, 2, 1), input_precision=PRECISION) * qk_scale
    s = tl.where((offs_t < N)[None, None, :], s, float("-inf"))
    m = tl.max(s, 2)
    p = tl.exp2(s - m[:, :, None])
    row_sum = tl.sum(p, 2)
    out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / row_sum[:, :, None]

    o_ptrs, _ = _packed_pointers(OUT, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, so)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask)
    lse_ptrs, lse_mask = _packed_lse_pointers(LSE, seq, seq_ok, offs_t, N, Z, HEADS, sl)
    tl.store(lse_ptrs, (m + tl.log2(row_sum)) * _LN2, mask=lse_mask)


@triton.autotune(
    configs=_configs("_packed_backward"),
    key=["T_PAD", "BLOCK_D", "NSEQ_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_packed("_packed_backward")},
)
@triton.jit
def _packed_backward(
    Q,
    K,
    V,
    OUT,
    DO,
    LSE,
    DQ,
    DK,
    DV,
    sq,
    sk,
    sv,
    so,
    sg,
    sl,
    sdq,
    sdk,
    sdv,
    NSEQ,
    Z,
    HEADS,
    N,
    D,
    scale,
    qk_scale,
    NSEQ_BUCKET,  # tuning key only, as in _packed_forward
    T_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    SEQS: tl.constexpr,
):
    seq, seq_ok, offs_t, offs_d = _packed_block(NSEQ, SEQS, T_PAD, BLOCK_D)
    q, mask = _packed_load(Q, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, sq)
    k, _ = _packed_load(K, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, sk)
    v, _ = _packed_load(V, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, sv)
    o, _ = _packed_load(OUT, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, so)
    do, _ = _packed_load(DO, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, sg)
    # The whole row is here, so rowsum(dO * O) needs no separate pass.
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 2)
    lse_ptrs, lse_mask = _packed_lse_pointers(LSE, seq, seq_ok, offs_t, N, Z, HEADS, sl)
    # lse = +inf on padded query rows makes their p exactly 0, so they add nothing.
    lse2 = tl.load(lse_ptrs, mask=lse_mask, other=float("inf")) * _LOG2E

    s = tl.dot(q, tl.trans(k, 0, 2, 1), input_precision=PRECISION) * qk_scale
    # Padded keys (zero vectors) score 0, and exp2(0 - lse) overflows when every real
    # score is far below 0, which inf * 0 would turn into NaN in dQ.
    p = tl.exp2(tl.where((offs_t < N)[None, None, :], s, float("-inf")) - lse2[:, :, None])
    dv = tl.dot(tl.trans(p, 0, 2, 1).to(do.dtype), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v, 0, 2, 1), input_precision=PRECISION)
    ds = p * (dp - delta[:, :, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
    dk = tl.dot(tl.trans(ds, 0, 2, 1).to(q.dtype), q, input_precision=PRECISION) * scale

    dq_ptrs, _ = _packed_pointers(DQ, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, sdq)
    dk_ptrs, _ = _packed_pointers(DK, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, sdk)
    dv_ptrs, _ = _packed_pointers(DV, seq, seq_ok, offs_t, offs_d, N, D, Z, HEADS, sdv)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers (the kernel-table contract of stt_kernels.ops.attention)


def _check(q: torch.Tensor) -> None:
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"the triton attention kernels take float32, float16 or bfloat16; got {q.dtype} "
            "(use backend='cpu' or 'reference' for float64)"
        )
    refuse_interpreted_bfloat16(q.dtype, "attention", "use backend='cpu', which takes bfloat16 CPU tensors")


def _precision(dtype: torch.dtype) -> str:
    # float32 products follow torch's own switch: TF32 (~1e-3 relative error) only when the
    # user allowed it for matmuls, as torch.matmul does; ROCm's Triton rejects "tf32" on
    # most GPUs. 16-bit inputs multiply natively whatever this says.
    if dtype == torch.float32 and not _HIP and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _sizes(q: torch.Tensor) -> tuple[int, int, int, int, int]:
    b, z, n, heads, d = q.shape
    return b, z, n, heads, d


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float
) -> None:
    """Write ``softmax(q k^T * scale) v`` into ``out`` and the rows' natural log-sum-exp into ``lse``."""
    _check(q)
    b, z, n, heads, d = _sizes(q)
    nseq = b * z * heads
    if nseq == 0 or n == 0:
        return
    # One stride tuple per tensor: Triton specialises each element (a unit head-dim stride
    # becomes a constant) as it would a scalar argument.
    strides = (q.stride(), k.stride(), v.stride(), out.stride(), lse.stride())
    meta = dict(BLOCK_D=_tile(d), PRECISION=_precision(q.dtype))
    qk_scale = scale * _LOG2E.value
    if _packed_fits(n, d, _PACKED_BUDGET_FORWARD):
        _packed_forward[lambda m: (triton.cdiv(nseq, m["SEQS"]),)](
            q, k, v, out, lse, *strides, nseq, z, heads, n, d, qk_scale, _bucket(nseq), T_PAD=_tile(n), **meta
        )
    else:
        _flash_forward[lambda m: (triton.cdiv(n, m["BLOCK_M"]) * nseq,)](
            q, k, v, out, lse, *strides, z, heads, n, d, qk_scale, **meta
        )


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    grad_out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    grad_v: torch.Tensor,
) -> None:
    """Write the gradients of q, k, v into ``grad_q``, ``grad_k``, ``grad_v``, recomputing the
    attention weights from ``lse``."""
    _check(q)
    b, z, n, heads, d = _sizes(q)
    nseq = b * z * heads
    if nseq == 0 or n == 0:
        return
    meta = dict(BLOCK_D=_tile(d), PRECISION=_precision(q.dtype))
    qk_scale = scale * _LOG2E.value
    if _packed_fits(n, d, _PACKED_BUDGET_BACKWARD):
        _packed_backward[lambda m: (triton.cdiv(nseq, m["SEQS"]),)](
            q,
            k,
            v,
            out,
            grad_out,
            lse,
            grad_q,
            grad_k,
            grad_v,
            q.stride(),
            k.stride(),
            v.stride(),
            out.stride(),
            grad_out.stride(),
            lse.stride(),
            grad_q.stride(),
            grad_k.stride(),
            grad_v.stride(),
            nseq,
            z,
            heads,
            n,
            d,
            scale,
            qk_scale,
            _bucket(nseq),
            T_PAD=_tile(n),
            **meta,
        )
        return

    # dK/dV per key block and dQ per query block, in two passes: each program owns its
    # output rows, so there are no atomics (deterministic, no fp32 dQ scratch, and the
    # autotuner may rerun a config without zeroing anything), at the price of computing
    # q k^T and dO v^T twice.
    delta = torch.empty((nseq, n), dtype=torch.float32, device=q.device)
    block_m = 16 if _INTERPRET else 64
    _flash_delta[(triton.cdiv(n, block_m) * nseq,)](
        out, grad_out, delta, out.stride(), grad_out.stride(), z, heads, n, d, BLOCK_M=block_m, BLOCK_D=meta["BLOCK_D"]
    )
    common = (q.stride(), k.stride(), v.stride(), grad_out.stride(), lse.stride())
    _flash_backward_dkdv[lambda m: (triton.cdiv(n, m["BLOCK_N"]) * nseq,)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        grad_k,
        grad_v,
        *common,
        grad_k.stride(),
        grad_v.stride(),
        z,
        heads,
        n,
        d,
        scale,
        qk_scale,
        **meta,
    )
    _flash_backward_dq[lambda m: (triton.cdiv(n, m["BLOCK_M"]) * nseq,)](
        q, k, v, grad_out, lse, delta, grad_q, *common, grad_q.stride(), z, heads, n, d, scale, qk_scale, **meta
    )


attention_kernels.register("triton", Kernels(on_tensor_device(forward), on_tensor_device(backward)))
