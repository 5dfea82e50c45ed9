"""Sampling the dalle network: the key/value cache, temperature, top-k, top-p, seeds, classifier-free guidance."""
from __future__ import annotations

import pytest
import torch

from dlas.errors import ConfigError
from dlas.models.transformer.attention import KVCache
from dlas.models.transformer.dalle import DalleTransformer
from dlas.models.transformer.sampling import filter_logits, guide

CAPTIONS = ["a red circle", "a blue square", "green"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def net() -> DalleTransformer:
    torch.manual_seed(0)
    net = DalleTransformer(text_length=16, image_vocab_size=32, image_grid=[3, 5], width=32, depth=3, heads=4,
                           text_vocab_size=258).eval()
    with torch.no_grad():  # sharper than at initialisation, so that captions and guidance matter
        for head in (net.image_head, net.text_head):
            head.weight.mul_(40)
    return net


def sample(net, captions=CAPTIONS, seed=0, **options) -> torch.Tensor:
    return net.generate_tokens(captions, torch.Generator().manual_seed(seed), **options)


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 8}, {"top_p": 0.8},
                                     {"guidance_scale": 3.0}])
def test_cached_sampling_equals_uncached_sampling_token_for_token(net, options):
    cached = sample(net, **options)
    assert cached.shape == (3, 3, 5) and cached.dtype == torch.long
    assert torch.equal(cached, sample(net, use_cache=False, **options))


def test_cached_logits_equal_a_full_forward_at_every_position(net):
    text = net.text_tokens(CAPTIONS)
    image = sample(net).flatten(1)
    _, full = net.logits(text, image)
    cache = KVCache(net.depth, net.text_length + net.image_length)
    for n in range(net.image_length):
        with torch.no_grad():
            step = net.next_image_logits(text, image[:, :n], cache)
        assert torch.allclose(step, full[:, n], atol=1e-5), n
        assert cache.length == net.text_length + 1 + n


def test_a_cache_extended_by_several_positions_at_once_matches_a_full_forward(net):
    # priming with the first image tokens (continuing an image) adds them to the cache in one call
    text = net.text_tokens(CAPTIONS)
    image = sample(net).flatten(1)
    _, full = net.logits(text, image)
    cache = KVCache(net.depth, net.text_length + net.image_length)
    with torch.no_grad():
        net.next_image_logits(text, image[:, :0], cache)
        primed = net.next_image_logits(text, image[:, :4], cache)
    assert torch.allclose(primed, full[:, 4], atol=1e-5)


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others(net):
    assert torch.equal(sample(net, seed=5), sample(net, seed=5))
    assert not torch.equal(sample(net, seed=5), sample(net, seed=6))


def test_top_k_of_one_is_greedy_whatever_the_seed(net):
    greedy = sample(net, seed=1, top_k=1)
    assert torch.equal(greedy, sample(net, seed=2, top_k=1))
    text = net.text_tokens(CAPTIONS)
    _, logits = net.logits(text, greedy.flatten(1))
    assert torch.equal(logits.argmax(-1), greedy.flatten(1))


def test_guidance_scale_one_equals_plain_conditional_sampling(net):
    # the guided path runs the empty caption alongside; at scale 1 it must not change a single token
    assert torch.equal(sample(net, guidance_scale=1.0), sample(net))


def test_guidance_scale_zero_samples_the_unconditional_model(net):
    assert torch.equal(sample(net, guidance_scale=0.0), sample(net, captions=["", "", ""]))


def test_guidance_changes_the_samples(net):
    assert not torch.equal(sample(net, guidance_scale=4.0), sample(net))


def test_guide_extrapolates_from_the_unconditional_towards_the_conditional_logits():
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.equal(guide(cond, uncond, 0.0), uncond)
    assert torch.equal(guide(cond, uncond, 3.0), torch.tensor([4.0, -2.0]))  # uncond + 3 (cond - uncond)


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]


def test_top_p_keeps_the_smallest_set_reaching_the_probability():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: (~torch.isinf(filter_logits(logits, top_p=p))).tolist()[0]
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]


@pytest.mark.parametrize("option, value", [("temperature", 0.0), ("top_k", 0), ("top_p", 1.5),
                                           ("guidance_scale", -1.0)])
def test_a_sampling_option_that_cannot_sample_is_a_config_error(net, option, value):
    with pytest.raises(ConfigError) as error:
        sample(net, **{option: value})
    assert error.value.problems[0].path == option


def test_sampling_leaves_a_training_network_in_training_mode(net):
    net.train()
    try:
        sample(net, captions=["x"])
        assert net.training
    finally:
        net.eval()
