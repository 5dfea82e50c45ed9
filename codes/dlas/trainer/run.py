"""Entry points the CLI calls: :func:`validate_config` and :func:`train` (with auto-resume)."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from dlas import build
from dlas import checkpoint as ckpt
from dlas.errors import ConfigError, DataError
from dlas.evaluators.base import EvalContext, Validation
from dlas.trainer.loop import TrainLoop, restore
from dlas.trainer.trainer import ExtensibleTrainer

log = logging.getLogger("dlas")


def share_cpu_with_loader_workers(num_workers: int, dist: Any = None) -> None:
    """On the CPU, leave one core per loader worker (and split the rest between ranks).

    Torch's intra-op threads spin while they wait for each other; when loader workers take their cores away,
    a step on 2 cores slowed by 10x in our measurements. With fewer threads than free cores that cannot happen.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = dist.world_size if dist else 1
    threads = max(1, (cores - num_workers) // ranks)
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
        log.info("using %d torch thread(s): %d cores, %d loader worker(s), %d rank(s)", threads, cores,
                 num_workers, ranks)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_batch(cfg: Mapping[str, Any], dataset: Any, name: str = "train") -> dict[str, Any]:
    """A batch of the dataset's first two items (one if it has one), collated as training will, for the start-up
    checks (so items that cannot be batched stop the run before it starts)."""
    from dlas.data.collate import ItemCollator

    collate = ItemCollator(name, cfg["datasets"][name]["item_keys"])
    return collate([dataset[i] for i in range(min(2, len(dataset)))])


def check_on_data(cfg: Mapping[str, Any], trainer: ExtensibleTrainer, dataset: Any) -> None:
    """The state graph (statically), then every injector and loss once on a real batch."""
    batch = sample_batch(cfg, dataset)
    trainer.check_graph(batch.keys())
    trainer.dry_run(batch)


def load_pretrained(cfg: Mapping[str, Any], trainer: ExtensibleTrainer) -> None:
    """``path.pretrain_model_NET: FILE`` for each network (skipped when resuming: the checkpoint wins)."""
    for name in build.load_pretrained(cfg, trainer.networks):
        if trainer.ema and name in trainer.ema.sources:
            trainer.ema.load_state_dicts({}, trainer.ema.updates)  # shadows restart from the loaded weights


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Build every component of ``cfg`` and check the state graph, raising ConfigError; trains nothing."""
    datasets = build.build_datasets(cfg)
    trainer = ExtensibleTrainer(cfg, torch.device("cpu"))
    build.build_evaluators(cfg)
    if "train" in datasets:
        check_on_data(cfg, trainer, datasets["train"])
    build.check_pretrained_files(cfg)


def train(cfg: Mapping[str, Any], run_dir: Path) -> None:
    """Train per ``cfg`` in ``run_dir``, resuming from its newest complete checkpoint when there is one."""
    from dlas.trainer import distributed

    dist = distributed.init_from_env(cfg)
    rank = dist.rank if dist else 0
    device = build.select_device(cfg["device"], dist.local_rank if dist else 0)
    if cfg["train"]["allow_tf32"] and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tcfg = cfg["datasets"]["train"]
    if device.type == "cpu":
        share_cpu_with_loader_workers(tcfg["num_workers"], dist)
    seed = cfg["seed"]
    seed_everything(seed)  # the same on every rank, so networks start identical
    datasets = build.build_datasets(cfg)
    trainer = ExtensibleTrainer(cfg, device, dist=dist)
    check_on_data(cfg, trainer, datasets["train"])
    evaluators = build.build_evaluators(cfg)

    resume = cfg["path"]["resume_state"]
    found = None
    if resume:
        folder = Path(resume)
        if not folder.is_dir():
            raise DataError("checkpoint folder does not exist (give experiments/NAME/checkpoints/STEP)",
                            "path.resume_state")
        problems = ckpt.verify_checkpoint(folder) if (folder / ckpt.MANIFEST).is_file() else \
            ["it has no manifest.json (an incomplete or foreign folder)"]
        if problems:
            raise DataError(f"cannot resume from {folder}: {'; '.join(problems)}", "path.resume_state")
        found = (int(ckpt.load_state(folder)["step"]), folder)
    else:
        found = ckpt.latest_valid_checkpoint(run_dir)
    if found:
        log.info("resuming from checkpoint %s (step %d)", found[1], found[0])
        restore(trainer, found[1], rank)
    else:
        build.check_pretrained_files(cfg)
        load_pretrained(cfg, trainer)
        seed_everything(seed + rank)

    world = dist.world_size if dist else 1
    batch_size = tcfg["batch_size"]
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} is the global batch and must divide by the {world} ranks",
                          "datasets.train.batch_size")
    if (batch_size // world) % trainer.mega_batch_factor:
        raise ConfigError(f"each rank's batch of {batch_size // world} cannot be split into "
                          f"{trainer.mega_batch_factor} equal micro-batches (train.mega_batch_factor)",
                          "datasets.train.batch_size")

    def make_loader(start_samples: int):
        from dlas.data.sampler import build_loader

        # the loop counts global samples; each rank consumed its share of them
        return build_loader(datasets["train"], batch_size=batch_size // world, num_workers=tcfg["num_workers"],
                            shuffle=tcfg["shuffle"], seed=seed, rank=rank, world_size=world,
                            start_samples=start_samples // world, pin_memory=device.type == "cuda",
                            name="train", item_keys=tcfg["item_keys"])

    def make_context(name: str, step: int) -> EvalContext:
        return EvalContext(networks=trainer.eval_networks(use_ema=True), datasets=datasets,
                           out_dir=run_dir / "val" / str(step) / name, step=step, device=device,
                           autocast=trainer.autocast, compute_losses=trainer.compute_losses, rank=rank,
                           world_size=world, all_reduce_sum=dist.all_reduce_sum if dist else (lambda t: t),
                           config=cfg)

    validation = Validation(evaluators, make_context)
    loop = TrainLoop(cfg, run_dir, trainer, make_loader, validation, dist, datasets["train"])
    try:
        loop.run()
        if dist:  # rank 0 may still be writing its last checkpoint: leave the group together, not one by one
            dist.barrier()
    finally:
        if dist:
            dist.shutdown()
