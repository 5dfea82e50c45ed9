"""The basic injectors, built from config dicts as a YAML file would give them."""
import pytest
import torch

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.registry import INJECTORS


def build(**cfg):
    return INJECTORS.build(cfg, "steps.gen.injectors.x")


class Doubler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, y=None, offset=0.0):
        return x * self.scale + (0 if y is None else y) + offset


class TwoOutputs(torch.nn.Module):
    def forward(self, x):
        return x + 1, x - 1


class DictOutput(torch.nn.Module):
    def forward(self, x):
        return {"mean": x.mean(), "max": x.max()}


@pytest.fixture
def ctx():
    return Context(networks={"doubler": Doubler(), "two": TwoOutputs(), "dict": DictOutput()}, iteration=1)


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 8, 8)


def test_generator_passes_one_key_and_stores_the_result(ctx, x):
    inj = build(type="generator", network="doubler", **{"in": "lq"}, out="gen")
    assert (inj.reads, inj.writes, inj.networks) == (["lq"], ["gen"], ["doubler"])
    out = inj({"lq": x}, ctx)
    assert torch.equal(out["gen"], x * 2)


def test_generator_passes_a_list_positionally(ctx, x):
    inj = build(type="generator", network="doubler", **{"in": ["lq", "extra"]}, out="gen")
    out = inj({"lq": x, "extra": torch.ones_like(x)}, ctx)
    assert torch.equal(out["gen"], x * 2 + 1)


def test_generator_passes_a_mapping_as_keywords_plus_constant_kwargs(ctx, x):
    inj = build(type="generator", network="doubler", **{"in": {"x": "lq", "y": "extra"}}, out="gen",
                kwargs={"offset": 10.0})
    assert inj.reads == ["lq", "extra"]
    out = inj({"lq": x, "extra": torch.ones_like(x)}, ctx)
    assert torch.allclose(out["gen"], x * 2 + 1 + 10)


def test_generator_with_grad_false_builds_no_graph(ctx, x):
    inj = build(type="generator", network="doubler", **{"in": "lq"}, out="gen", grad=False)
    out = inj({"lq": x.requires_grad_()}, ctx)
    assert not out["gen"].requires_grad and out["gen"].grad_fn is None


def test_generator_with_grad_builds_a_graph_to_the_parameters(ctx, x):
    out = build(type="generator", network="doubler", **{"in": "lq"}, out="gen")({"lq": x}, ctx)
    out["gen"].sum().backward()
    assert ctx.networks["doubler"].scale.grad == pytest.approx(x.sum().item(), rel=1e-5)


def test_generator_unpacks_multiple_outputs_into_a_list_of_keys(ctx, x):
    out = build(type="generator", network="two", **{"in": "lq"}, out=["plus", "minus"])({"lq": x}, ctx)
    assert torch.equal(out["plus"], x + 1) and torch.equal(out["minus"], x - 1)


def test_generator_with_one_out_key_keeps_a_tuple_result_whole(ctx, x):
    out = build(type="generator", network="two", **{"in": "lq"}, out="both")({"lq": x}, ctx)
    assert isinstance(out["both"], tuple) and len(out["both"]) == 2


def test_generator_maps_dict_results_to_state_keys(ctx, x):
    out = build(type="generator", network="dict", **{"in": "lq"}, out={"mean": "mu"})({"lq": x}, ctx)
    assert list(out) == ["mu"] and torch.equal(out["mu"], x.mean())


def test_generator_output_count_mismatch_names_the_network(ctx, x):
    inj = build(type="generator", network="two", **{"in": "lq"}, out=["a", "b", "c"])
    with pytest.raises(ValueError, match="'two' returned 2 outputs"):
        inj({"lq": x}, ctx)


def test_generator_rejects_an_argument_given_twice():
    with pytest.raises(ConfigError, match="kwargs"):
        build(type="generator", network="doubler", **{"in": {"x": "lq"}}, kwargs={"x": 1})


def test_noise_adds_gaussian_noise_of_the_given_std(ctx):
    torch.manual_seed(0)
    hq = torch.zeros(4, 3, 64, 64)
    out = build(type="noise", **{"in": "hq"}, out="noisy", std=0.1)({"hq": hq}, ctx)["noisy"]
    assert out.mean().abs() < 0.01 and out.std() == pytest.approx(0.1, rel=0.03)


def test_noise_range_draws_one_std_per_sample_within_the_range(ctx):
    torch.manual_seed(0)
    hq = torch.zeros(8, 1, 64, 64)
    out = build(type="noise", **{"in": "hq"}, out="noisy", std=[0.0, 0.5])({"hq": hq}, ctx)["noisy"]
    stds = out.flatten(1).std(dim=1)
    assert stds.max() < 0.55 and stds.std() > 0.05  # the samples differ


def test_noise_uses_the_global_rng(ctx, x):
    inj = build(type="noise", **{"in": "hq"}, out="noisy", std=0.1)
    torch.manual_seed(3)
    first = inj({"hq": x}, ctx)["noisy"]
    torch.manual_seed(3)
    assert torch.equal(first, inj({"hq": x}, ctx)["noisy"])


def test_interpolate_by_scale_factor_matches_functional_interpolate(ctx, x):
    out = build(type="interpolate", **{"in": "hq"}, out="lq", scale_factor=0.5, mode="bicubic")({"hq": x}, ctx)["lq"]
    expected = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bicubic", align_corners=False)
    assert out.shape == (2, 3, 4, 4) and torch.equal(out, expected)


def test_interpolate_to_size(ctx, x):
    out = build(type="interpolate", **{"in": "hq"}, out="big", size=[16, 12], mode="nearest")({"hq": x}, ctx)["big"]
    assert out.shape == (2, 3, 16, 12)
    assert torch.equal(out, torch.nn.functional.interpolate(x, size=(16, 12), mode="nearest"))


def test_interpolate_needs_exactly_one_of_scale_factor_and_size():
    with pytest.raises(ConfigError, match="exactly one"):
        build(type="interpolate", **{"in": "hq"}, out="lq")
    with pytest.raises(ConfigError, match="exactly one"):
        build(type="interpolate", **{"in": "hq"}, out="lq", size=4, scale_factor=0.5)


def test_crop_at_a_fixed_offset(ctx, x):
    out = build(type="crop", **{"in": "hq"}, out="patch", size=[3, 4], offset=[1, 2])({"hq": x}, ctx)["patch"]
    assert torch.equal(out, x[:, :, 1:4, 2:6])


def test_random_crop_takes_a_window_of_each_sample(ctx):
    torch.manual_seed(0)
    # Each pixel holds its own coordinates, so a crop reveals where it came from.
    rows = torch.arange(16.0).view(1, 1, 16, 1).expand(32, 1, 16, 16)
    out = build(type="crop", **{"in": "hq"}, out="patch", size=4)({"hq": rows}, ctx)["patch"]
    assert out.shape == (32, 1, 4, 4)
    tops = out[:, 0, 0, 0]
    assert torch.equal(out[:, 0, :, 0] - tops[:, None], torch.arange(4.0).expand(32, 4))
    assert tops.min() >= 0 and tops.max() <= 12 and len(tops.unique()) > 3  # positions differ per sample


def test_crop_larger_than_the_image_names_the_key(ctx, x):
    with pytest.raises(ValueError, match="does not fit 'hq' of size 8x8"):
        build(type="crop", **{"in": "hq"}, out="patch", size=9)({"hq": x}, ctx)


def test_constant_fills_a_tensor_shaped_like_its_reference(ctx, x):
    out = build(type="constant", like="hq", out="zeros", value=0.5)({"hq": x.double()}, ctx)["zeros"]
    assert out.shape == x.shape and out.dtype == torch.float64 and torch.all(out == 0.5)


def test_randn_like_draws_standard_normal_noise_of_the_same_shape(ctx):
    torch.manual_seed(0)
    out = build(type="randn_like", like="hq", out="z")({"hq": torch.zeros(4, 3, 32, 32)}, ctx)["z"]
    assert out.shape == (4, 3, 32, 32)
    assert out.mean().abs() < 0.05 and out.std() == pytest.approx(1.0, rel=0.05)


def test_detach_cuts_the_graph_of_a_tensor_and_of_each_item_of_a_tuple(ctx, x):
    y = x.requires_grad_() * 2
    inj = build(type="detach", **{"in": "gen"}, out="gen_d")
    assert not inj({"gen": y}, ctx)["gen_d"].requires_grad
    pair = inj({"gen": (y, y)}, ctx)["gen_d"]
    assert isinstance(pair, tuple) and not any(t.requires_grad for t in pair)


def test_add_sums_keys_with_weights(ctx, x):
    inj = build(type="add", **{"in": ["a", "b"]}, out="s", weights=[2.0, -1.0])
    assert inj.reads == ["a", "b"]
    assert torch.equal(inj({"a": x, "b": torch.ones_like(x)}, ctx)["s"], 2 * x - 1)


def test_add_without_weights_is_a_plain_sum(ctx, x):
    out = build(type="add", **{"in": ["a", "b", "c"]}, out="s")({"a": x, "b": x, "c": x}, ctx)["s"]
    assert torch.allclose(out, 3 * x)


def test_add_needs_one_weight_per_key():
    with pytest.raises(ConfigError, match="2 weights for 3 keys"):
        build(type="add", **{"in": ["a", "b", "c"]}, out="s", weights=[1.0, 1.0])


def test_scale_multiplies_by_the_factor(ctx, x):
    assert torch.equal(build(type="scale", **{"in": "a"}, out="b", factor=-0.5)({"a": x}, ctx)["b"], x * -0.5)


def test_index_picks_one_output_of_a_tuple(ctx, x):
    inj = build(type="index", **{"in": "outs"}, out="second", index=-1)
    assert torch.equal(inj({"outs": (x, x + 1)}, ctx)["second"], x + 1)


def test_index_selects_along_a_tensor_dimension(ctx, x):
    out = build(type="index", **{"in": "hq"}, out="green", index=1, dim=1)({"hq": x}, ctx)["green"]
    assert out.shape == (2, 8, 8) and torch.equal(out, x[:, 1])


def test_index_out_of_range_says_how_many_items_there_are(ctx, x):
    with pytest.raises(ValueError, match="has 2 items"):
        build(type="index", **{"in": "outs"}, out="o", index=2)({"outs": [x, x]}, ctx)


def test_unknown_option_is_a_config_error_with_its_path():
    with pytest.raises(ConfigError, match=r"steps\.gen\.injectors\.x\.sclae"):
        build(type="scale", **{"in": "a"}, out="b", sclae=2.0)
