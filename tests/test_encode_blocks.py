"""ops.set_encode_block_bytes: the row-block size of topk_encode's encoder GEMM
on CUDA (the emulated tests, test_emu_ops.py, run a second block)."""
import pytest

ops = pytest.importorskip("dualenc_fast.ops")


def test_encode_block_bytes_setting():
    before = ops.encode_block_bytes()
    assert before == 256 << 20
    try:
        ops.set_encode_block_bytes(4096)
        assert ops.encode_block_bytes() == 4096
        for bad in (0, -1, 1.5, True, "1"):
            with pytest.raises(ValueError, match="argument 'nbytes' must be an int >= 1"):
                ops.set_encode_block_bytes(bad)
        assert ops.encode_block_bytes() == 4096
    finally:
        ops.set_encode_block_bytes(before)
