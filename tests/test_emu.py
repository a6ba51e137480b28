"""The CUDA emulator itself (csrc/emu): a kernel using every emulated
primitive against hand-computed results, 16-byte vector loads, and kernels
that misuse barriers, warp intrinsics and loads (a misaligned 16-byte load),
which must raise (naming kernel, block and thread), never
hang, under thread order and seeded schedules."""
import os
import subprocess
import sys

import pytest
import torch

from emu_util import SEEDS, require_emu

from dualenc_fast import emu

C = require_emu()
FIELDS = 16


def lanes_sum_down():
    s = list(range(32))
    for off in (16, 8, 4, 2, 1):
        s = [s[l] + (s[l + off] if l + off < 32 else s[l]) for l in range(32)]
    return s


def expected_primitives():
    bx, by, gx, gy = 48, 2, 2, 3
    n = bx * by
    red = lanes_sum_down()
    out = []
    for blk in range(gx * gy):
        for t in range(n):
            lane = t % 32
            v = lambda l: l * 10 + blk  # noqa: E731
            s8 = (lane // 8) * 8
            s16 = (lane // 16) * 16
            ffs = (t & -t).bit_length() if t else 0
            clz = 32 - (t + 1).bit_length()
            bf = int(torch.tensor(t + 0.5).to(torch.bfloat16).float())
            hf = int(torch.tensor(t * 0.25).to(torch.float16).float() * 4)
            out += [
                t + 1000 * (bx + 100 * by + 10000),
                blk + 1000 * (gx + 100 * gy + 10000),
                sum(1 << l for l in range(0, 32, 3)),
                1 + 4,
                v(31 - lane),
                v(lane - 1 if lane - 1 >= s8 else lane),
                v(lane + 2 if lane + 2 < s16 + 16 else lane),
                v(lane ^ 5),
                red[lane],
                1000 * blk + (t + 1) % n,
                n * 1000 + max(u * 7 % 50 for u in range(n)),
                n - 1 - t,
                bin(t).count("1") + 100 * ffs + 10000 * clz,
                hf + 1000 * bf,
                (0xAAAA if lane < 16 else 0),
                0xFFFFFFFF,
            ]
    return out + [gx * gy * n]


@pytest.mark.parametrize("seed", SEEDS)
def test_every_primitive(seed):
    with emu.schedule(seed):
        got = C.selftest("primitives")
    want = expected_primitives()
    assert len(got) == len(want)
    bad = [(i // FIELDS, i % FIELDS, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"(thread, field, got, want) first mismatches: {bad[:10]}"


@pytest.mark.parametrize("seed", SEEDS)
def test_vector_loads(seed):
    """uint4 loads through __ldg (the top-k select's 16-byte reads of z)."""
    with emu.schedule(seed):
        assert C.selftest("vector_load") == [16 * t + 6 for t in range(64)]


def test_missing_syncthreads_is_caught_under_seeds():
    right = [(t + 32) % 64 + 1 for t in range(64)]
    with emu.schedule(0):
        assert C.selftest("missing_sync") == right  # thread order hides the race
    caught = []
    for seed in (1, 2, 3):
        with emu.schedule(seed):
            caught.append(C.selftest("missing_sync") != right)
    assert any(caught), "no seeded schedule exposed the missing __syncthreads"


ERRORS = {
    "divergent_barrier": r"divergent barrier",
    "barrier_after_exit": r"every thread of a block must reach every barrier",
    "exited_lane_mask": r"exited",
    "partial_warp_mask": r"naming lane 8, which has exited or does not exist",
    "deadlock": r"deadlock in kernel deadlock_kernel, block \(0,0,0\)",
    "mismatched_ops": r"mismatched warp operations",
    "mask_without_self": r"does not name its own lane",
    "shfl_outside_mask": r"reads lane 16 .*not named in the mask",
    "trap": r"thread \(7,0,0\) called __trap",
    "misaligned": r"thread \(5,0,0\) made a misaligned 16-byte access to 0x[0-9a-f]+ at \S*selftest\.cu:\d+",
    "bad_block": r"invalid configuration argument: block \(2048,1,1\)",
    "big_shared": r"kernel missing_sync_kernel: 65536 bytes of dynamic shared memory exceed the 49152 bytes",
    "misaligned_load": r"thread \(9,0,0\): misaligned load: __ldg of a 16-byte value .*not a multiple of 16",
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_misuse_raises_never_hangs(case, seed):
    with emu.schedule(seed):
        with pytest.raises(RuntimeError, match=ERRORS[case]) as info:
            C.selftest(case)
    msg = str(info.value)
    if case not in ("bad_block", "big_shared", "shfl_outside_mask"):
        assert "kernel " in msg and "block (0,0,0)" in msg
    # the emulator is usable after an error
    assert C.selftest("missing_sync") is not None


def test_dynamic_shared_opt_in():
    """Over 48 KiB of dynamic shared memory after cudaFuncSetAttribute (the
    tiled sparse_decode forward launches with 96 KiB)."""
    assert C.selftest("big_shared_opt_in") == list(range(63, -1, -1))


def test_seed_setting():
    with emu.schedule(5):
        assert emu.schedule_seed() == 5
        C.selftest("missing_sync")
        assert C.launch_count() == 1
    with pytest.raises(ValueError, match="'seed' must be an int >= 0"):
        emu.set_schedule_seed(-1)
    code = "from dualenc_fast import emu; print(emu.schedule_seed())"
    env = dict(os.environ, EMU_SEED="7")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "7"


def test_strategy_setting_is_validated():
    with pytest.raises(ValueError, match="'mode' must be one of"):
        emu.set_strategy("fast")
    with pytest.raises(ValueError, match="'encode_block_bytes' must be an int >= 1"):
        emu.set_strategy(encode_block_bytes=0)
    with emu.strategy_scope("dense", encode_block_bytes=100):
        assert emu.strategy()["mode"] == "dense" and emu.strategy()["encode_block_bytes"] == 100
    assert emu.strategy()["encode_block_bytes"] == 256 << 20


@pytest.mark.skipif(not C.sanitized, reason="needs the ASan build of the emulated module (DUALENC_EMU_SANITIZE=ON)")
def test_shared_overflow_caught_by_asan():
    code = "from dualenc_fast import emu; emu.module().selftest('shared_overflow')"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True)
    assert out.returncode != 0
    assert "AddressSanitizer" in out.stderr and "global-buffer-overflow" in out.stderr
