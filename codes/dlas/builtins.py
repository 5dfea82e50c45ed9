"""Where each built-in component lives: ``name -> module`` per registry, imported on first use.

This table is what keeps ``import dlas`` fast and a broken optional dependency local to the component that
needs it. ``tests/test_registry.py`` checks that it matches the ``@X.register("name")`` decorators in the
source, so a component added without an entry here (or an entry without a component) fails the tests.
"""

NETWORKS = {
    # SR generators and discriminators
    "rrdbnet": "dlas.models.sr.rrdbnet",
    "srresnet": "dlas.models.sr.srresnet",
    "compact_sr": "dlas.models.sr.compact",
    "vgg_discriminator": "dlas.models.sr.discriminators",
    "unet_discriminator": "dlas.models.sr.discriminators",
    # normalizing-flow SR
    "srflow": "dlas.models.srflow.srflow",
    # switched convolutions
    "switched_vae": "dlas.models.switched.vae",
    "switched_rrdbnet": "dlas.models.switched.rrdbnet",
    # discrete VAE (triforce)
    "dvae": "dlas.models.vqvae.dvae",
    # diffusion
    "diffusion_unet": "dlas.models.diffusion.unet",
    "dalle": "dlas.models.transformer.dalle",
}

INJECTORS = {
    "generator": "dlas.injectors.basic",
    "noise": "dlas.injectors.basic",
    "interpolate": "dlas.injectors.basic",
    "crop": "dlas.injectors.basic",
    "constant": "dlas.injectors.basic",
    "randn_like": "dlas.injectors.basic",
    "detach": "dlas.injectors.basic",
    "add": "dlas.injectors.basic",
    "scale": "dlas.injectors.basic",
    "index": "dlas.injectors.basic",
    "image_patch": "dlas.injectors.sr",
    "gaussian_diffusion": "dlas.injectors.diffusion",
    "flow_warp": "dlas.injectors.warp",
    "dvae_encode": "dlas.injectors.dalle",
}

LOSSES = {
    "pix": "dlas.losses.pixel",
    "direct": "dlas.losses.pixel",
    "perceptual": "dlas.losses.perceptual",
    "generator_gan": "dlas.losses.gan",
    "discriminator_gan": "dlas.losses.gan",
    "gradient_penalty": "dlas.losses.gan",
    "translational": "dlas.losses.translational",
}

DATASETS = {
    "image_folder": "dlas.data.image_folder",
    "paired_folder": "dlas.data.paired_folder",
    "single_image": "dlas.data.single_image",
    "tar_shards": "dlas.data.tar_shards",
    "shapes": "dlas.data.shapes",
    "text_image": "dlas.data.text_image",
    "token_shards": "dlas.data.tokens",
}

EVALUATORS = {
    "sr": "dlas.evaluators.sr",
    "loss": "dlas.evaluators.loss",
    "srflow": "dlas.evaluators.srflow",
    "reconstruction": "dlas.evaluators.reconstruction",
    "samples": "dlas.evaluators.samples",
    "shapes_accuracy": "dlas.evaluators.dalle",
}

OPTIMIZERS = {
    "adam": "dlas.trainer.optimizers",
    "adamw": "dlas.trainer.optimizers",
    "sgd": "dlas.trainer.optimizers",
}

DEGRADATIONS = {
    "blur": "dlas.data.degradations",
    "motion_blur": "dlas.data.degradations",
    "sinc": "dlas.data.degradations",
    "resize": "dlas.data.degradations",
    "noise": "dlas.data.degradations",
    "jpeg": "dlas.data.degradations",
    "color_jitter": "dlas.data.degradations",
    "resize_to_lq": "dlas.data.degradations",
    "chain": "dlas.data.degradations",
    "shuffle": "dlas.data.degradations",
    "one_of": "dlas.data.degradations",
}

TASKS = {
    "upscale": "dlas.inference.tasks",
    "reconstruct": "dlas.inference.tasks",
    "sample": "dlas.inference.tasks",
    "diffusion": "dlas.inference.diffusion",
    "dalle": "dlas.inference.dalle",
}

SCHEDULERS = {
    "constant": "dlas.trainer.schedulers",
    "multistep": "dlas.trainer.schedulers",
    "cosine": "dlas.trainer.schedulers",
    "linear_warmup": "dlas.trainer.schedulers",
}
