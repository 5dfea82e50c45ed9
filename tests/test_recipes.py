"""Every recipe in options/ validates and trains 3 steps with tiny overrides (small nets, bundled photos)."""
from __future__ import annotations

from pathlib import Path

import pytest

from dlas.cli.train import main

OPTIONS = Path(__file__).resolve().parents[1] / "options"
RECIPES = sorted(p.name for p in OPTIONS.glob("*.yml"))

DATA = ["datasets.train.paths=['skimage:astronaut,coffee']", "datasets.train.batch_size=2",
        "datasets.train.num_workers=0", "datasets.val.paths=[skimage:chelsea]"]
PERCEPTUAL = ["steps.generator.losses.perceptual.weights_path=random"]
TINY_RRDB = ["networks.generator.nf=8", "networks.generator.nb=1", "networks.generator.gc=4"]
TINY_D = ["networks.discriminator.nf=8"]
TINY_UNET = ["networks.generator.model_channels=8", "networks.generator.channel_mult=[1,2]",
             "networks.generator.attention_at=[2]", "networks.generator.norm_groups=4",
             "networks.generator.num_res_blocks=1", "eval.samples.options={steps: 2}", "eval.samples.max_items=1"]
TINY_DVAE = ["networks.dvae.width=8", "networks.dvae.codebook_size=16", "networks.dvae.codebook_dim=8",
             "datasets.train.batch_size=2", "datasets.train.num_workers=0"]
PHOTOS = ["datasets.train.paths=['skimage:astronaut,coffee']", "datasets.train.target_size=32",
          "datasets.val.paths=[skimage:chelsea]", "datasets.val.target_size=32", "eval.reconstruction.max_images=1"]
TINY_SWITCHED_VAE = DATA + ["datasets.train.target_size=16", "networks.generator.nf=4"]

TINY_DALLE = [  # images encoded on the fly by an untrained tiny dVAE instead of extracted token shards
    "datasets.train={type: shapes, count: 4, batch_size: 2, num_workers: 0}",
    "datasets.val={type: shapes, count: 2, variant: 1}",
    "steps.dalle.injectors={encode: {type: dvae_encode, network: dvae, in: hq, out: image_tokens}, "
    "forward: {type: generator, network: dalle, in: {text: caption, image_tokens: image_tokens}, "
    "out: {text_loss: text_loss, image_loss: image_loss}}}",
    "networks.dalle.tokenizer=bytes", "networks.dalle.text_vocab_size=258", "networks.dalle.text_length=8",
    "networks.dalle.width=16", "networks.dalle.depth=1", "networks.dalle.heads=2", "networks.dvae.width=8",
    "networks.dvae.res_blocks=0", "path.pretrain_model_dvae=null", "eval.samples.count=1",
    "eval.accuracy.max_items=1", "eval.accuracy.count=1"]

# Per recipe: overrides that make it tiny and switch its gated parts on within 3 steps.
TINY = {
    "quickstart_sr.yml": DATA + ["networks.generator.nf=8", "networks.generator.num_conv=2"],
    "esrgan_psnr_x4.yml": DATA + TINY_RRDB,
    "esrgan_x4.yml": DATA + TINY_RRDB + TINY_D + PERCEPTUAL + [
        "steps.discriminator.after=1", "steps.generator.losses.perceptual.after=1",
        "steps.generator.losses.translational.after=1", "steps.generator.losses.gan.after=1"],
    "esrgan_reference_x4.yml": DATA + TINY_RRDB + TINY_D + PERCEPTUAL,
    "srgan_srresnet_x4.yml": DATA + TINY_D + PERCEPTUAL + ["networks.generator.nf=8", "networks.generator.nb=1"],
    "srflow_x4.yml": ["datasets.train.paths=['skimage:astronaut,coffee']", "datasets.train.batch_size=2",
                      "datasets.train.num_workers=0", "datasets.train.target_size=32",
                      "networks.generator.nf=8", "networks.generator.nb=1", "networks.generator.K=1",
                      "networks.generator.L=2", "networks.generator.hidden_channels=8",
                      "networks.generator.encoder_blocks=[0]", "networks.generator.train_encoder_after=1",
                      "datasets.val={type: single_image, paths: ['skimage:chelsea'], scale: 4}",
                      "eval.srflow.center_crop=32", "eval.srflow.max_images=1"],
    "diffusion_sr_x4.yml": DATA + TINY_UNET + ["datasets.train.target_size=32", "datasets.val.target_size=32"],
    "triforce_diffusion_shapes.yml": TINY_UNET + ["datasets.train.batch_size=2", "datasets.val.count=1"],
    "triforce_dvae_shapes.yml": TINY_DVAE + ["datasets.val.count=2"],
    "triforce_dvae_photos256.yml": TINY_DVAE + PHOTOS,
    "switched_vae.yml": TINY_SWITCHED_VAE,
    "plain_vae.yml": TINY_SWITCHED_VAE,
    "switched_vae_from_plain.yml": TINY_SWITCHED_VAE + ["path.pretrain_model_generator=null"],
    "triforce_dalle_shapes.yml": TINY_DALLE,
}


def test_every_recipe_has_tiny_overrides():
    assert set(RECIPES) == set(TINY), "add the new recipe to TINY in this test"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_validates(recipe):
    overrides = [o for o in TINY[recipe]]
    assert main(["-opt", str(OPTIONS / recipe), *overrides, "--validate"]) == 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_three_steps(recipe, tmp_path):
    overrides = TINY[recipe] + ["train.niter=3", "train.val_freq=3", "logger.print_freq=1",
                                "logger.save_checkpoint_freq=3", f"path.root={tmp_path}"]
    assert main(["-opt", str(OPTIONS / recipe), *overrides]) == 0
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1
    assert (runs[0] / "checkpoints" / "3" / "manifest.json").is_file()


def test_a_shape_mistake_in_a_late_gated_loss_is_caught_at_start(capsys):
    # the discriminator only switches on after 100k steps; its input_size must still match the crop now
    args = ["-opt", str(OPTIONS / "esrgan_x4.yml"), *TINY["esrgan_x4.yml"], "networks.discriminator.input_size=256"]
    args = [a for a in args if not a.startswith("steps.discriminator.after")]
    assert main([*args, "--validate"]) == 2
    err = capsys.readouterr().err
    assert "error: steps.discriminator.losses.gan" in err and "fails on a real training batch" in err
    assert "Traceback" not in err


def test_the_dalle_recipes_dvae_is_the_dvae_recipes_network():
    """triforce_dalle_shapes.yml loads the dVAE run's weights into its own copy of the network: the copy must
    have the shapes the dVAE recipe trains (a changed width once made the transformer's start fail)."""
    from dlas.config import load_config

    dvae = load_config(str(OPTIONS / "triforce_dvae_shapes.yml"))["networks"]["dvae"]
    dalle = load_config(str(OPTIONS / "triforce_dalle_shapes.yml"), training=False)["networks"]["dvae"]
    shape_keys = ("quantizer", "codebook_size", "downsample", "width", "channel_mult", "res_blocks", "codebook_dim",
                  "norm")
    assert {k: dvae.get(k) for k in shape_keys} == {k: dalle.get(k) for k in shape_keys}
    step = load_config(str(OPTIONS / "triforce_dvae_shapes.yml"))["train"]["niter"]
    weights = load_config(str(OPTIONS / "triforce_dalle_shapes.yml"), training=False)["path"]["pretrain_model_dvae"]
    assert f"checkpoints/{step}/" in weights  # the dVAE run's last checkpoint
