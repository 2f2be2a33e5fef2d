"""EpochOrderSampler: one global order per epoch, dealt by Accelerate's batch sharding, resumable at any sample."""

from __future__ import annotations

import pytest
from accelerate.data_loader import BatchSamplerShard
from timm.data.distributed_sampler import RepeatAugSampler as TimmRepeatAugSampler
from torch.utils.data import BatchSampler

from trainer.data.dataset import EpochSampler
from trainer.data.sampler import EpochOrderSampler


def deal(sampler: EpochOrderSampler, processes: int) -> list[list[list[tuple]]]:
    """Each process's micro-batches, as the train loader gets them (drop_last, Accelerate's sharding)."""
    batches = BatchSampler(sampler, sampler.batch_size, drop_last=True)
    return [list(BatchSamplerShard(batches, processes, rank)) for rank in range(processes)]


def steps(sampler: EpochOrderSampler, processes: int, accumulation: int) -> list[list[list[tuple]]]:
    """The micro-batches of each optimizer step, in the order of the epoch's global order."""
    shares = deal(sampler, processes)
    rounds = [[share[i] for share in shares] for i in range(len(shares[0]))]
    return [sum(rounds[i : i + accumulation], []) for i in range(0, len(rounds), accumulation)]


def test_without_repeats_the_order_is_the_epoch_samplers_in_whole_rounds():
    sampler = EpochOrderSampler(50, seed=3, epoch_unit=8, batch_size=4)
    sampler.set_epoch(2)
    plain = EpochSampler(50, shuffle=True, seed=3)
    plain.set_epoch(2)
    assert list(sampler) == list(plain)[:48] and len(sampler) == sampler.epoch_samples == 48


@pytest.mark.parametrize("repeats", [1, 3])
def test_a_step_takes_the_same_micro_batches_on_any_process_count(repeats):
    """Global batch 24 of 4 per device: 1 x 6, 2 x 3 or 3 x 2 (processes x accumulation)."""
    made = {}
    for processes in (1, 2, 3, 6):
        sampler = EpochOrderSampler(110, seed=1, epoch_unit=24, batch_size=4, repeats=repeats)
        sampler.set_epoch(1)
        made[processes] = [sorted(map(tuple, step)) for step in steps(sampler, processes, 6 // processes)]
    assert made[1] == made[2] == made[3] == made[6] and len(made[1]) == 110 // 24


@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 3), (1, 2), (3, 3)])
@pytest.mark.parametrize("repeats", [1, 3])
def test_resumed_on_another_count_every_sample_exactly_once(before, after, repeats):
    def sampler() -> EpochOrderSampler:
        s = EpochOrderSampler(97, seed=5, epoch_unit=24, batch_size=4, repeats=repeats)
        s.set_epoch(4)
        return s

    whole = sampler()
    done_steps = 2
    first = steps(whole, before, 6 // before)[:done_steps]  # the killed run's steps
    rest = sampler()
    rest.set_start(done_steps * 24)
    later = steps(rest, after, 6 // after)
    seen = [key for step in first + later for batch in step for key in batch]
    assert sorted(seen) == sorted(whole.order()) and len(seen) == len(set(seen)) == whole.epoch_samples
    # and the same steps as the uninterrupted run
    assert [sorted(sum(s, [])) for s in first + later] == [
        sorted(sum(s, [])) for s in steps(whole, before, 6 // before)
    ]


def test_epoch_length_is_whole_global_batches_and_independent_of_processes():
    assert EpochOrderSampler(100, seed=0, epoch_unit=24, batch_size=4).epoch_samples == 96
    assert EpochOrderSampler(100, seed=0, epoch_unit=24, batch_size=4, repeats=3).epoch_samples == 96
    # timm: 512 of 600 images
    assert EpochOrderSampler(600, seed=0, epoch_unit=24, batch_size=4, repeats=3).epoch_samples == 504


@pytest.mark.parametrize(
    ("n", "repeats", "world", "batch"), [(21, 3, 1, 4), (600, 3, 2, 8), (300, 2, 4, 5), (50, 3, 3, 2)]
)
def test_without_accumulation_each_process_gets_timms_share(n, repeats, world, batch):
    """timm deals the repeated list round-robin (`indices[rank::world]`): the same here, in whole batches."""
    sampler = EpochOrderSampler(n, seed=7, epoch_unit=batch * world, batch_size=batch, repeats=repeats)
    sampler.set_epoch(2)
    repeated = sampler.order()
    for rank, share in enumerate(deal(sampler, world)):
        got = [key for b in share for key in b]
        assert got == repeated[rank::world][: len(got)]
        timm_len = len(TimmRepeatAugSampler(list(range(n)), num_replicas=world, rank=rank, num_repeats=repeats))
        assert timm_len - batch < len(got) <= timm_len


def test_copies_of_an_image_are_numbered_and_go_to_different_micro_batches():
    sampler = EpochOrderSampler(300, seed=0, epoch_unit=12, batch_size=4, repeats=3)
    order = sampler.order()
    assert [c for _, _, c in order[:6]] == [0, 1, 2, 0, 1, 2] and order[0][1] == order[1][1] == order[2][1]
    first_step = deal(sampler, 3)
    firsts = [share[0][0] for share in first_step]
    assert len({i for _, i, _ in firsts}) == 1 and sorted(c for _, _, c in firsts) == [0, 1, 2]


def test_order_is_a_function_of_seed_and_epoch():
    a, b = (EpochOrderSampler(40, seed=1, epoch_unit=8, batch_size=4, repeats=3) for _ in range(2))
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b) and all(key[0] == 1 for key in b)
