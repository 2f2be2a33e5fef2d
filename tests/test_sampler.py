"""RepeatAugSampler: timm's per-process shares, laid out for Accelerate's batch sharding."""

from __future__ import annotations

import pytest
from accelerate.data_loader import BatchSamplerShard
from timm.data.distributed_sampler import RepeatAugSampler as TimmRepeatAugSampler
from torch.utils.data import BatchSampler

from trainer.data.sampler import RepeatAugSampler


@pytest.mark.parametrize(("n", "repeats", "world", "batch"), [(21, 3, 1, 4), (600, 3, 2, 8), (300, 2, 4, 5), (50, 3, 3, 2)])
def test_each_process_gets_timms_share_in_whole_batches(n, repeats, world, batch):
    sampler = RepeatAugSampler(n, repeats, seed=7, num_replicas=world, batch_size=batch)
    sampler.set_epoch(2)
    batches = BatchSampler(sampler, batch, drop_last=True)
    for rank in range(world):
        got = [key for b in BatchSamplerShard(batches, world, rank) for key in b]
        share = sampler.process_share(rank)
        assert got == share[: len(got)] and len(got) == sampler.batches_per_process * batch
        # The same length as timm's sampler gives this process, up to the last partial batch.
        timm_len = len(TimmRepeatAugSampler(list(range(n)), num_replicas=world, rank=rank, num_repeats=repeats))
        assert sampler.per_process == timm_len and len(got) > timm_len - batch


def test_copies_of_an_image_are_consecutive_and_numbered():
    sampler = RepeatAugSampler(10, 3, seed=0, num_replicas=1, batch_size=2)
    keys = sampler.process_share(0)
    assert [c for _, _, c in keys[:6]] == [0, 1, 2, 0, 1, 2]
    assert keys[0][1] == keys[1][1] == keys[2][1]


def test_copies_go_to_different_processes_as_in_timm():
    sampler = RepeatAugSampler(300, 3, seed=0, num_replicas=3, batch_size=4)
    firsts = [sampler.process_share(r)[0] for r in range(3)]
    assert len({i for _, i, _ in firsts}) == 1 and sorted(c for _, _, c in firsts) == [0, 1, 2]


def test_order_is_a_function_of_seed_and_epoch():
    a, b = RepeatAugSampler(40, 3, 1, 2, 4), RepeatAugSampler(40, 3, 1, 2, 4)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b) and all(key[0] == 1 for key in b)
