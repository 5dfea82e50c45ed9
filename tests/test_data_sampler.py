"""Specification of the resumable sampler and build_loader: epochs, ranks, exact resumption."""
import itertools

import pytest
import torch

from dlas.data.base import SeededDataset, sample_rng
from dlas.data.sampler import ResumableSampler, build_loader
from dlas.errors import ConfigError


def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


class RandomVectors(SeededDataset):
    """A tiny seeded dataset: item i of epoch e is a vector drawn from its own generator."""

    def __init__(self, length=10):
        super().__init__()
        self.length = length

    def __len__(self):
        return self.length

    def load(self, index, rng):
        return {"index": index, "x": torch.from_numpy(rng.standard_normal(3))}


def test_each_epoch_visits_every_index_once():
    sampler = ResumableSampler(10, shuffle=True, seed=0)
    keys = take(sampler, 30)
    for epoch in range(3):
        assert sorted(i for e, i in keys if e == epoch) == list(range(10))


def test_epochs_are_reshuffled_and_the_seed_fixes_the_order():
    keys = take(ResumableSampler(50, shuffle=True, seed=1), 100)
    first, second = [i for _, i in keys[:50]], [i for _, i in keys[50:]]
    assert first != second and first != list(range(50))
    assert keys == take(ResumableSampler(50, shuffle=True, seed=1), 100)
    assert keys != take(ResumableSampler(50, shuffle=True, seed=2), 100)


def test_without_shuffle_indices_are_in_order():
    assert [i for _, i in take(ResumableSampler(4, shuffle=False, seed=0), 8)] == [0, 1, 2, 3] * 2


@pytest.mark.parametrize("position", [0, 3, 9, 10, 17, 25])
def test_resume_yields_exactly_the_rest_of_the_uninterrupted_sequence(position):
    uninterrupted = take(ResumableSampler(10, shuffle=True, seed=3), 40)
    resumed = ResumableSampler(10, shuffle=True, seed=3)
    resumed.load_state_dict(resumed.state_for(position))
    assert take(resumed, 40 - position) == uninterrupted[position:]


def test_state_for_counts_whole_epochs_and_the_position_inside_one():
    sampler = ResumableSampler(10, shuffle=True, seed=0, batch_size=4)  # 8 samples per epoch, 2 dropped
    assert sampler.state_for(19) == {"epoch": 2, "position": 3}


def test_state_dict_reports_what_was_handed_out():
    sampler = ResumableSampler(10, shuffle=True, seed=0)
    iterator = iter(sampler)
    for _ in range(13):
        next(iterator)
    assert sampler.state_dict() == {"epoch": 1, "position": 3}


def test_two_ranks_split_each_epoch_into_disjoint_halves():
    ranks = [ResumableSampler(10, shuffle=True, seed=4, rank=r, world_size=2, drop_last=False) for r in range(2)]
    shares = [take(s, 10) for s in ranks]  # two epochs of 5 per rank
    for epoch in range(2):
        halves = [{i for e, i in share if e == epoch} for share in shares]
        assert halves[0].isdisjoint(halves[1]) and halves[0] | halves[1] == set(range(10))


def test_two_ranks_resume_independently_and_exactly():
    for rank in range(2):
        uninterrupted = take(ResumableSampler(11, True, 5, rank=rank, world_size=2), 20)
        resumed = ResumableSampler(11, True, 5, rank=rank, world_size=2)
        resumed.load_state_dict(resumed.state_for(7))
        assert take(resumed, 13) == uninterrupted[7:]


def test_drop_last_gives_each_rank_whole_batches():
    sampler = ResumableSampler(23, shuffle=True, seed=0, rank=1, world_size=2, batch_size=4)
    assert sampler.samples_per_epoch == 8
    assert [e for e, _ in take(sampler, 16)] == [0] * 8 + [1] * 8


def test_without_drop_last_ranks_get_equal_shares_by_wrapping():
    shares = [take(ResumableSampler(5, False, 0, rank=r, world_size=2, drop_last=False), 3) for r in range(2)]
    assert [i for _, i in shares[0]] == [0, 2, 4] and [i for _, i in shares[1]] == [1, 3, 0]


def test_dataset_smaller_than_a_batch_lets_batches_span_epochs():
    loader = build_loader(RandomVectors(3), batch_size=4, seed=0)
    first_batch = next(iter(loader))["index"].tolist()
    assert sorted(first_batch[:3]) == [0, 1, 2] and len(first_batch) == 4


def test_dataset_smaller_than_the_number_of_ranks_is_a_config_error():
    with pytest.raises(ConfigError, match="ranks"):
        ResumableSampler(1, shuffle=True, seed=0, rank=0, world_size=2)


def test_resumed_loader_with_workers_continues_with_the_next_batch():
    dataset = RandomVectors(10)
    uninterrupted = list(itertools.islice(build_loader(dataset, 3, num_workers=2, seed=9), 7))
    # Consumed 4 batches of 3 (crossing the epoch boundary at 9 samples), then stopped; workers had prefetched.
    resumed = list(itertools.islice(build_loader(dataset, 3, num_workers=2, seed=9, start_samples=12), 3))
    for expected, got in zip(uninterrupted[4:], resumed):
        assert torch.equal(expected["index"], got["index"]) and torch.equal(expected["x"], got["x"])


def test_validation_loader_makes_one_pass_over_every_item():
    loader = build_loader(RandomVectors(7), batch_size=3, shuffle=False, training=False)
    indices = torch.cat([batch["index"] for batch in loader]).tolist()
    assert indices == list(range(7)) and len(loader) == 3


def test_item_generator_depends_on_seed_epoch_and_index():
    draws = {key: sample_rng(*key).random() for key in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]}
    assert len(set(draws.values())) == 4 and sample_rng(0, 0, 0).random() == draws[(0, 0, 0)]


def test_validation_loader_repeats_the_same_pass_each_time():
    loader = build_loader(RandomVectors(5), batch_size=2, shuffle=False, training=False)
    passes = [torch.cat([batch["x"] for batch in loader]) for _ in range(2)]
    assert passes[0].shape == (5, 3) and torch.equal(passes[0], passes[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_starting_a_loader_leaves_the_global_torch_generator_alone(workers):
    # A resumed run starts its loader at another moment than the uninterrupted one; if starting it consumed
    # global random numbers, everything drawn afterwards (noise injectors, dropout) would differ.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(build_loader(RandomVectors(6), batch_size=2, num_workers=workers, seed=1)))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("seed", [2**62, 2**64 - 1])
def test_a_64_bit_seed_builds_a_working_loader(seed):
    loader = build_loader(RandomVectors(6), batch_size=2, seed=seed, rank=1, world_size=2)
    assert len(next(iter(loader))["index"]) == 2
