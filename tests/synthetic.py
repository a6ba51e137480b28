"""A small activation store shared by the trainer, device and distributed tests:
1200 rows of d = 12 built from 24 sparse directions plus noise, in 4 shards."""
import torch

from dualenc_fast.train.data import write_store

D_, F_, K_ = 12, 48, 8


def synthetic_store(folder):
    torch.manual_seed(0)
    basis = torch.randn(24, D_)
    codes = torch.relu(torch.randn(1200, 24) - 1.0)
    x = codes @ basis + 0.05 * torch.randn(1200, D_)
    return write_store(x, folder, shard_rows=300)
