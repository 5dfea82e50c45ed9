"""Entry points the CLI calls: :func:`validate_config` and :func:`train` (with auto-resume)."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from dlas.errors import ConfigError, DataError, Problem
from dlas.registry import DATASETS, EVALUATORS
from dlas.trainer import checkpoint as ckpt
from dlas.trainer.loop import TrainLoop, restore
from dlas.trainer.trainer import ExtensibleTrainer

log = logging.getLogger("dlas")

LOADER_KEYS = ("batch_size", "num_workers", "shuffle")


def select_device(cfg: Mapping[str, Any], local_rank: int = 0) -> torch.device:
    choice = cfg.get("device", "auto")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')", "device")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


def build_datasets(cfg: Mapping[str, Any], names: Optional[list[str]] = None) -> dict[str, Any]:
    """Every dataset of ``datasets:`` (or the named ones), with the run's seed; all problems reported at once."""
    datasets, problems = {}, []
    for name, dcfg in cfg.get("datasets", {}).items():
        if names is not None and name not in names:
            continue
        try:
            dataset = DATASETS.build(dict(dcfg), f"datasets.{name}", reserved=LOADER_KEYS)
        except DataError as exc:  # a file problem names the file already
            problems += exc.problems
            continue
        except ConfigError as exc:  # the dataset knows its options, not its config name: prefix it
            problems += [p if p.path.startswith("datasets.") else
                         Problem(f"datasets.{name}.{p.path}".rstrip("."), p.message, p.line, p.file)
                         for p in exc.problems]
            continue
        dataset.seed = cfg.get("seed", 0)
        datasets[name] = dataset
    if problems:
        raise ConfigError(problems)
    return datasets


def build_evaluators(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {name: EVALUATORS.build(dict(ecfg), f"eval.{name}") for name, ecfg in (cfg.get("eval") or {}).items()}


def sample_batch(dataset: Any) -> dict[str, Any]:
    """A batch of the dataset's first two items (one if it has one), for the start-up checks."""
    from torch.utils.data import default_collate

    return default_collate([dataset[i] for i in range(min(2, len(dataset)))])


def check_on_data(trainer: ExtensibleTrainer, dataset: Any) -> None:
    """The state graph (statically), then every injector and loss once on a real batch."""
    batch = sample_batch(dataset)
    trainer.check_graph(batch.keys())
    trainer.dry_run(batch)


def load_pretrained(cfg: Mapping[str, Any], trainer: ExtensibleTrainer) -> None:
    """``path.pretrain_model_NET: FILE`` for each network (skipped when resuming: the checkpoint wins)."""
    from dlas.weights import load_network_weights

    paths = cfg.get("path", {})
    for key, file in paths.items():
        if not key.startswith("pretrain_model_") or not file:
            continue
        name = key[len("pretrain_model_"):]
        report = load_network_weights(trainer.networks[name], file, strict=paths.get("strict_load", True))
        if report.complete:
            log.info("loaded pretrained weights for '%s' from %s: %s", name, file, report.summary())
        else:  # strict_load: false took what fit; say precisely what did not
            log.warning("pretrained weights for '%s' from %s did not match completely (strict_load is false): %s",
                        name, file, report.summary())
        if trainer.ema and name in trainer.ema.sources:
            trainer.ema.load_state_dicts({}, trainer.ema.updates)  # shadows restart from the loaded weights


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Build every component of ``cfg`` and check the state graph, raising ConfigError; trains nothing."""
    datasets = build_datasets(cfg)
    trainer = ExtensibleTrainer(cfg, torch.device("cpu"))
    build_evaluators(cfg)
    if "train" in datasets:
        check_on_data(trainer, datasets["train"])
    for key, file in (cfg.get("path") or {}).items():
        if key.startswith("pretrain_model_") and file and not Path(file).is_file():
            raise ConfigError(f"pretrained weights file '{file}' does not exist", f"path.{key}")


def train(cfg: Mapping[str, Any], run_dir: Path) -> None:
    """Train per ``cfg`` in ``run_dir``, resuming from its newest complete checkpoint when there is one."""
    from dlas.trainer import distributed

    dist = distributed.init_from_env(cfg)
    rank = dist.rank if dist else 0
    device = select_device(cfg, dist.local_rank if dist else 0)
    if cfg["train"].get("allow_tf32") and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        share_cpu_with_loader_workers(cfg["datasets"].get("train", {}).get("num_workers", 0), dist)
    seed = cfg.get("seed", 0)
    seed_everything(seed)  # the same on every rank, so networks start identical
    datasets = build_datasets(cfg)
    if "train" not in datasets:
        raise ConfigError("training needs a 'train' dataset", "datasets.train")
    trainer = ExtensibleTrainer(cfg, device, dist=dist)
    check_on_data(trainer, datasets["train"])
    evaluators = build_evaluators(cfg)

    resume = cfg.get("path", {}).get("resume_state")
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
        load_pretrained(cfg, trainer)
        seed_everything(seed + rank)

    tcfg = cfg["datasets"]["train"]
    world = dist.world_size if dist else 1
    batch_size = tcfg.get("batch_size", 1)
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
        return build_loader(datasets["train"], batch_size=batch_size // world,
                            num_workers=tcfg.get("num_workers", 0), shuffle=tcfg.get("shuffle", True), seed=seed,
                            rank=rank, world_size=world, start_samples=start_samples // world,
                            pin_memory=device.type == "cuda")

    def evaluate(step: int) -> dict[str, float]:
        from dlas.evaluators.base import EvalContext

        metrics: dict[str, float] = {}
        nets = trainer.eval_networks(use_ema=True)
        with torch.no_grad():
            for name, evaluator in evaluators.items():
                ctx = EvalContext(networks=nets, datasets=datasets, out_dir=run_dir / "val" / str(step) / name,
                                  step=step, device=device, autocast=trainer.autocast,
                                  compute_losses=trainer.compute_losses, rank=rank, world_size=world,
                                  all_reduce_sum=dist.all_reduce_sum if dist else (lambda t: t))
                metrics.update({f"{name}/{k}": float(v) for k, v in evaluator(ctx).items()})
        return metrics

    def higher_is_better(key: str) -> bool:
        name, _, metric = key.partition("/")
        evaluator = evaluators.get(name)
        return evaluator.is_higher_better(metric) if hasattr(evaluator, "is_higher_better") else "loss" not in key

    loop = TrainLoop(cfg, run_dir, trainer, make_loader, evaluate if evaluators else None, dist, higher_is_better,
                     datasets["train"])
    try:
        loop.run()
    finally:
        if dist:
            dist.shutdown()
