"""Captions -> images: the dalle inference task (decoded by the dVAE) and on-the-fly encoding with dvae_encode."""
from __future__ import annotations

import contextlib

import pytest
import torch

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.inference.tasks import Request, build_task, default_task
from dlas.registry import INJECTORS, NETWORKS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DVAE = {"type": "dvae", "codebook_size": 16, "downsample": 4, "width": 8, "codebook_dim": 8, "res_blocks": 0}
DALLE = {"type": "dalle", "text_length": 8, "text_vocab_size": 258, "image_vocab_size": 16, "image_grid": 4,
         "width": 16, "depth": 1, "heads": 2}
CONFIG = {"networks": {"dvae": DVAE, "dalle": DALLE},
          "eval": {"samples": {"type": "samples", "network": "dalle", "captions": ["a red circle"]}}}


@pytest.fixture(scope="module")
def networks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    built = {name: NETWORKS.build(dict(entry)).eval() for name, entry in CONFIG["networks"].items()}
    dalle = built["dalle"]
    with torch.no_grad():  # sharp predictions from the caption alone: the image inputs carry nothing
        dalle.image_head.weight.mul_(40)
        for embedding in (dalle.image_embedding, dalle.image_row_embedding, dalle.image_column_embedding):
            embedding.weight.zero_()
    return built


def task(networks, **options):
    return build_task("dalle", networks, CONFIG, torch.device("cpu"), contextlib.nullcontext, options)


def test_a_dalle_run_samples_with_the_dalle_task_by_default():
    assert default_task(CONFIG) == "dalle"


def test_the_task_writes_count_images_of_the_dvae_s_size(networks):
    images = task(networks)(Request("x", caption="a red circle", seed=0, count=3))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1


def test_the_images_are_the_dvae_decoding_the_sampled_tokens(networks):
    images = task(networks, top_k=4)(Request("x", caption="a red circle", seed=7, count=2))
    tokens = networks["dalle"].generate_tokens(["a red circle"] * 2, torch.Generator().manual_seed(7), top_k=4)
    assert torch.equal(images, networks["dvae"].decode(tokens))


def test_the_same_seed_gives_the_same_images_and_another_seed_others(networks):
    run = task(networks)
    first = run(Request("x", caption="a red circle", seed=3, count=2))
    assert torch.equal(first, run(Request("x", caption="a red circle", seed=3, count=2)))
    assert not torch.equal(first, run(Request("x", caption="a red circle", seed=4, count=2)))


def test_no_caption_samples_the_unconditional_model(networks):
    dalle = networks["dalle"]
    tokens = dalle.generate_tokens(dalle.empty_caption(1), torch.Generator().manual_seed(1))
    assert torch.equal(task(networks)(Request("x", seed=1)), networks["dvae"].decode(tokens))


def test_several_temperatures_give_the_samples_at_each_in_order(networks):
    both = task(networks, temperatures=[0.5, 2.0])(Request("x", caption="a", seed=0, count=2))
    assert both.shape[0] == 4
    assert torch.equal(both[:2], task(networks, temperature=0.5)(Request("x", caption="a", seed=0, count=2)))


def test_an_image_request_is_refused(networks):
    with pytest.raises(ConfigError, match="takes no image"):
        task(networks)(Request("x", image=torch.zeros(3, 16, 16)))


def test_a_network_that_writes_no_tokens_is_a_config_error_naming_network(networks):
    with pytest.raises(ConfigError) as error:
        task(networks, network="dvae")
    assert error.value.problems[0].path == "task.network"


def test_a_run_without_a_dvae_is_a_config_error_naming_dvae(networks):
    config = {"networks": {"dalle": DALLE}}
    with pytest.raises(ConfigError) as error:
        build_task("dalle", {"dalle": networks["dalle"]}, config, torch.device("cpu"), contextlib.nullcontext)
    assert error.value.problems[0].path == "task.dvae"


def test_a_bad_sampling_option_is_a_config_error_naming_it(networks):
    with pytest.raises(ConfigError) as error:
        task(networks, top_p=2.0)
    assert error.value.problems[0].path == "task.top_p"


def test_dvae_encode_writes_the_dvae_tokens_in_eval_mode_and_keeps_its_mode():
    # the trainer puts every network in training mode; with batch norm the tokens would then depend on the batch
    torch.manual_seed(0)
    dvae = NETWORKS.build({**DVAE, "norm": "batch", "res_blocks": 1}).train()
    injector = INJECTORS.build({"type": "dvae_encode", "network": "dvae", "in": "hq", "out": "image_tokens"})
    images = torch.rand(4, 3, 16, 16)
    out = injector({"hq": images}, Context(networks={"dvae": dvae}))
    assert dvae.training
    assert out["image_tokens"].shape == (4, 4, 4) and not out["image_tokens"].requires_grad
    assert not torch.equal(dvae.encode(images), dvae.eval().encode(images))  # the mode matters here
    assert torch.equal(out["image_tokens"], dvae.encode(images))


def test_dvae_encode_on_a_network_without_encode_is_a_config_error(networks):
    injector = INJECTORS.build({"type": "dvae_encode", "network": "dalle"})
    with pytest.raises(ConfigError, match="encode"):
        injector({"hq": torch.rand(1, 3, 16, 16)}, Context(networks=networks))
