import os
import tempfile

# torch.compile's on-disk cache is keyed without our op schemas: a cache filled by
# another build of the extension can replay stale calls. Each test session gets its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="dualenc-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Keep the suite polite on small shared machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))

HAS_CUDA = torch.cuda.is_available()

DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.cuda)]

# (B, d, F, k, K) every op is tested at, compiled and emulated: awkward on
# purpose: d=1, odd d, k=1, k=F, F of no special size, B=0.
OP_SHAPES = [
    (7, 5, 37, 4, 6),
    (3, 1, 11, 1, 3),
    (5, 9, 9, 9, 5),  # k = F
    (0, 6, 13, 3, 4),  # B = 0
    (33, 17, 101, 12, 7),
]
OP_SHAPE_IDS = ["basic", "d1_k1", "k_eq_F", "B0", "odd"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: intra-op threads only add contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


RUN_LONG = os.environ.get("DUALENC_LONG", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_long = pytest.mark.skip(reason="long-running: set DUALENC_LONG=1 to run it")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "long" in item.keywords and not RUN_LONG:
            item.add_marker(skip_long)
