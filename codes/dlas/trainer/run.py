"""Entry points the CLI calls: :func:`validate_config` and :func:`train` (with auto-resume).

Resuming reads a checkpoint as untrusted input in three stages: :func:`read_checkpoint` (the files its manifest
lists, each checked on its own: a broken one makes the run fall back to the previous checkpoint),
:func:`check_fits` (does it fit this config: a ConfigError naming the option otherwise) and :func:`restore`.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from dlas import build
from dlas import checkpoint as ckpt
from dlas.errors import ConfigError, DataError, Problem, UserError
from dlas.evaluators.base import EvalContext, Validation
from dlas.trainer import speed
from dlas.trainer.loop import TrainLoop
from dlas.trainer.rng import check_rng_state, rng_state, set_rng_state
from dlas.trainer.signals import StopSignals
from dlas.trainer.trainer import ExtensibleTrainer
from dlas.weights import compare_state_dicts

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


def sample_batch(cfg: Mapping[str, Any], dataset: Any, name: str = "train",
                 size: Optional[int] = None) -> dict[str, Any]:
    """A batch collated as training will: of the dataset's first two items (one if it has one) for the start-up
    checks (so items that cannot be batched stop the run before it starts), or of ``size`` items (the first ones,
    repeated if it has fewer) for measuring a step."""
    from dlas.data.collate import ItemCollator

    collate = ItemCollator(name, cfg["datasets"][name]["item_keys"])
    indices = range(min(2, len(dataset))) if size is None else [i % len(dataset) for i in range(size)]
    return collate([dataset[i] for i in indices])


def check_on_data(cfg: Mapping[str, Any], trainer: ExtensibleTrainer, dataset: Any) -> None:
    """The state graph (statically), then every injector and loss once on a real batch."""
    batch = sample_batch(cfg, dataset)
    trainer.check_graph(batch.keys())
    trainer.dry_run(batch)


def measure_speed(cfg: Mapping[str, Any], device: torch.device, dist: Any, dataset: Any,
                  rank_batch: int) -> speed.Choice:
    """``precision``/``channels_last: auto`` measured on a full batch of ``dataset`` (:mod:`dlas.trainer.speed`);
    under torchrun every rank measures and rank 0's choice is returned on all."""
    batch = sample_batch(cfg, dataset, size=rank_batch)
    choice, report = speed.measure(cfg, device, batch, lambda probe_cfg: ExtensibleTrainer(probe_cfg, device))
    if dist:
        choice = dist.broadcast_object(choice)
    log.info("auto: %s; %s", speed.describe(choice), report)
    return choice


def load_pretrained(cfg: Mapping[str, Any], trainer: ExtensibleTrainer) -> None:
    """``path.pretrain_model_NET: FILE`` for each network (skipped when resuming: the checkpoint wins)."""
    for name in build.load_pretrained(cfg, trainer.networks):
        if trainer.ema and name in trainer.ema.sources:
            trainer.ema.load_state_dicts({}, trainer.ema.updates)  # shadows restart from the loaded weights


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Build every component of ``cfg`` and check the state graph, raising ConfigError; trains nothing.

    The datasets, the networks and steps (with their losses' weight files), the evaluators and the pretrained
    files are independent, so the problems of all of them are reported together; the state graph on a real
    batch needs them all and is checked once they are right.
    """
    problems: list[Problem] = []

    def attempt(build_part: Callable[[], Any]) -> Any:
        try:
            return build_part()
        except UserError as exc:
            problems.extend(exc.problems)
            return None

    datasets = attempt(lambda: build.build_datasets(cfg))
    trainer = attempt(lambda: ExtensibleTrainer(cfg, torch.device("cpu")))
    attempt(lambda: build.build_evaluators(cfg))
    attempt(lambda: build.check_pretrained_files(cfg))
    if problems:
        raise ConfigError(problems)
    if "train" in datasets:
        check_on_data(cfg, trainer, datasets["train"])


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def state_problems(state: Mapping[str, Any]) -> list[str]:
    """What a ``state.pt`` lacks of what a resume needs (the trainer's keys and the loop's); empty: usable."""
    problems = []
    if not _count(state.get("step")):
        problems.append(f"'step' must be a step count, found {state.get('step')!r}")
    steps = state.get("steps")
    if not isinstance(steps, dict):
        problems.append("'steps' (each step's optimizer state) is missing")
        steps = {}
    for name, saved in steps.items():
        optimizer = saved.get("optimizer") if isinstance(saved, dict) else None
        groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
        if not isinstance(optimizer.get("state") if isinstance(optimizer, dict) else None, dict) or \
                not isinstance(groups, list) or \
                not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            problems.append(f"the optimizer state of step '{name}' is malformed")
        elif any(saved.get(key) is not None and not isinstance(saved[key], dict) for key in ("scheduler", "scaler")):
            problems.append(f"the scheduler or grad scaler state of step '{name}' is malformed")
    for key in ("bad_steps", "bad_total", "ema_updates", "samples"):
        if key in state and not _count(state[key]):
            problems.append(f"'{key}' must be a count, found {state[key]!r}")
    rng = state.get("rng", {})
    for rank, saved in (rng.items() if isinstance(rng, dict) else [("?", None)]):
        try:
            check_rng_state(saved)
        except Exception as exc:  # noqa: BLE001 (untrusted data: any failure means it cannot be used)
            problems.append(f"the RNG state of rank {rank} is unusable ({type(exc).__name__})")
    if "speed" in state and (problem := speed.speed_problem(state["speed"])):
        problems.append(problem)
    types = state.get("types", {})
    if not isinstance(types, dict) or not all(isinstance(v, dict) for v in types.values()):
        problems.append("'types' (the optimizer and scheduler classes) is malformed")
    return problems


@dataclass
class Checkpoint:
    """One checkpoint folder read from disk and checked on its own, not yet applied to a trainer."""

    step: int
    folder: Path
    state: dict
    weights: dict[str, dict[str, torch.Tensor]]


def read_checkpoint(folder: Path) -> Checkpoint:
    """Read the files ``folder``'s manifest lists (and no others) and check them; a DataError naming the file."""
    folder = Path(folder)
    manifest = ckpt.read_manifest(folder)
    state = ckpt.load_state(folder)
    problems = state_problems(state)
    if not problems and state["step"] != manifest["step"]:
        problems.append(f"says step {state['step']}, but its manifest says {manifest['step']}")
    if problems:
        raise DataError("; ".join(problems), str(folder / ckpt.STATE))
    stems = [name[:-len(ckpt.WEIGHTS_SUFFIX)] for name in manifest["files"] if name.endswith(ckpt.WEIGHTS_SUFFIX)]
    weights = {}
    for stem in stems:
        weights[stem] = ckpt.load_weights(folder, stem)
        if weights[stem] is None:
            raise DataError("listed in the manifest but missing", str(folder / f"{stem}{ckpt.WEIGHTS_SUFFIX}"))
    return Checkpoint(manifest["step"], folder, state, weights)


def check_fits(trainer: ExtensibleTrainer, checkpoint: Checkpoint) -> None:
    """A ConfigError for each part of the config the checkpoint cannot be loaded into: a network whose weights
    have other names or shapes, a step whose optimizer or scheduler is another kind (changed options, or another
    run's checkpoint); the checkpoint is named in each message."""
    where = f"checkpoint {checkpoint.folder}"
    problems = []
    files = [(name, name, net) for name, net in trainer.networks.items()]  # (file stem, network, module)
    if trainer.ema:  # an EMA missing from the checkpoint starts from the live weights; one present must fit
        files += [(trainer.ema.file_stem(rate, name), name, shadow) for rate, shadows in trainer.ema.shadows.items()
                  for name, shadow in shadows.items()]
    for stem, name, net in files:
        saved = checkpoint.weights.get(stem)
        if any(p.path == f"networks.{name}" for p in problems):
            continue  # one problem per network: its EMA does not fit either
        if saved is None:
            if stem == name:
                problems.append(Problem(f"networks.{name}", f"{where} has no weights for this network "
                                                            f"({stem}.safetensors)"))
            continue
        report = compare_state_dicts(net.state_dict(), saved)
        if not report.complete:
            problems.append(Problem(f"networks.{name}", f"does not fit the weights of {where} ({stem}.safetensors: "
                                                        f"{report.differences()}): the network's options differ from "
                                                        "the ones it was trained with"))
    types = checkpoint.state.get("types", {})
    for step in trainer.steps:
        saved = checkpoint.state["steps"].get(step.name)
        if saved is None:
            continue
        for kind, current, key in (("optimizer", step.optimizer, "optimizers"),
                                   ("scheduler", step.scheduler, "schedulers")):
            recorded = (types.get(key) or {}).get(step.name)
            now = None if current is None else f"{type(current).__module__}.{type(current).__qualname__}"
            if recorded and now and recorded != now:
                problems.append(Problem(f"steps.{step.name}.{'optimizer' if kind == 'optimizer' else 'lr_scheduler'}",
                                        f"is a {now}, but {where} was trained with a {recorded}"))
        if any(p.path == f"steps.{step.name}.optimizer" for p in problems):
            continue  # another type: that its state does not fit either goes without saying
        groups, own = saved["optimizer"]["param_groups"], step.optimizer.state_dict()["param_groups"]
        foreign = sorted({k for g in groups for k in g} - {k for g in own for k in g})
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in own] or foreign:
            detail = f"settings {', '.join(foreign)} it does not have" if foreign else \
                f"{[len(g['params']) for g in groups]} parameters per group, this one {[len(g['params']) for g in own]}"
            problems.append(Problem(f"steps.{step.name}.optimizer", f"does not fit the optimizer state of {where} "
                                                                    f"({detail}): the networks it trains or its type "
                                                                    "changed"))
    if problems:
        raise ConfigError(problems)


def restore(trainer: ExtensibleTrainer, checkpoint: Checkpoint, rank: int = 0) -> None:
    """Load a checked checkpoint into ``trainer`` and the process RNGs (the run continues bit-identically)."""
    check_fits(trainer, checkpoint)
    try:
        trainer.load_state_dict(checkpoint.state, checkpoint.weights)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"cannot be loaded into this run ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})",
                        str(checkpoint.folder)) from exc
    rng = checkpoint.state.get("rng", {})
    if rank in rng:
        set_rng_state(rng[rank])
    elif rng:
        log.warning("the checkpoint has no RNG state for rank %d (different world size?): reseeding", rank)


def choose_checkpoint(cfg: Mapping[str, Any], run_dir: Path, fresh: bool = False) -> Optional[Checkpoint]:
    """The checkpoint to resume from: ``path.resume_state`` if given, else the run folder's newest complete one
    that can be read, falling back to the previous one (with a warning naming both) when it cannot."""
    resume = cfg["path"]["resume_state"]
    if resume:
        folder = Path(resume)
        if not folder.is_dir():
            raise DataError("checkpoint folder does not exist (give experiments/NAME/checkpoints/STEP)",
                            "path.resume_state")
        problems = ckpt.verify_checkpoint(folder)
        if problems:
            raise DataError(f"cannot resume from {folder}: {'; '.join(problems)}", "path.resume_state")
        return read_checkpoint(folder)
    if fresh:
        return None
    saved = ckpt.saved_checkpoints(run_dir)
    failed: Optional[DataError] = None
    for _, folder in ckpt.complete_checkpoints(run_dir):
        try:
            checkpoint = read_checkpoint(folder)
        except DataError as exc:
            log.warning("cannot resume from checkpoint %s: %s", folder, exc)
            failed = failed or exc
            continue
        if folder != saved[-1][1]:
            log.warning("resuming from the previous complete checkpoint %s instead of the newest, %s, which cannot "
                        "be loaded (see above)", folder, saved[-1][1])
        return checkpoint
    if saved:
        raise DataError(f"none of this run's checkpoints can be loaded (the newest, {saved[-1][1]}: see the warnings "
                        "above); move the broken ones aside, or start over with --fresh",
                        str(ckpt.checkpoint_root(run_dir)))
    return None


def train(cfg: Mapping[str, Any], run_dir: Path, fresh: bool = False,
          on_start: Optional[Callable[[], None]] = None) -> None:
    """Train per ``cfg`` in ``run_dir``, resuming from its newest complete checkpoint when there is one.

    Nothing in ``run_dir`` is written until the run has started: everything is built, the checkpoint is read,
    checked and loaded, and only then ``on_start()`` is called (the CLI writes ``config.yml`` there), interrupted
    saves of dead processes are cleaned up, and the first step runs. ``fresh``: do not resume from ``run_dir``
    (``on_start`` moves the old folder aside). SIGINT/SIGTERM are handled from the first line on
    (:class:`~dlas.trainer.signals.StopSignals`).
    """
    signals = StopSignals().install()
    try:
        _train(cfg, Path(run_dir), fresh, on_start, signals)
    finally:
        signals.restore()


def _train(cfg: Mapping[str, Any], run_dir: Path, fresh: bool, on_start: Optional[Callable[[], None]],
           signals: StopSignals) -> None:
    from dlas.trainer import distributed

    dist = distributed.init_from_env(cfg)
    signals.dist = dist
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
    construction_rng = rng_state()  # a trainer rebuilt for precision/channels_last: auto starts from these weights
    trainer = ExtensibleTrainer(cfg, device, dist=dist)
    world = dist.world_size if dist else 1
    batch_size = tcfg["batch_size"]
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} is the global batch and must divide by the {world} ranks",
                          "datasets.train.batch_size")
    if (batch_size // world) % trainer.mega_batch_factor:
        raise ConfigError(f"each rank's batch of {batch_size // world} cannot be split into "
                          f"{trainer.mega_batch_factor} equal micro-batches (train.mega_batch_factor)",
                          "datasets.train.batch_size")
    check_on_data(cfg, trainer, datasets["train"])
    evaluators = build.build_evaluators(cfg)

    checkpoint = choose_checkpoint(cfg, run_dir, fresh)
    if speed.has_auto(cfg):
        choice = speed.recorded_choice(cfg, checkpoint.state if checkpoint else None)
        if choice is None:
            del trainer  # the measurement's throwaway trainers need the memory
            choice = measure_speed(cfg, device, dist, datasets["train"], batch_size // world)
        else:
            log.info("auto: %s, as measured when this run started", speed.describe(choice))
        set_rng_state(construction_rng)  # built and checked as a config saying the choice would be
        trainer = ExtensibleTrainer(speed.apply_choice(cfg, choice), device, dist=dist)
        trainer.speed = choice
        check_on_data(cfg, trainer, datasets["train"])
    if checkpoint:
        log.info("resuming from checkpoint %s (step %d)", checkpoint.folder, checkpoint.step)
        restore(trainer, checkpoint, rank)
        del checkpoint  # its tensors are in the trainer now
    else:
        build.check_pretrained_files(cfg)
        load_pretrained(cfg, trainer)
        seed_everything((seed + rank) % 2**64)
    if not fresh:
        ckpt.read_best(run_dir)  # a malformed best.json stops the run here, before anything is written

    def make_loader(start_samples: int):
        from dlas.data.sampler import build_loader

        # the loop counts global samples; each rank consumed its share of them
        return build_loader(datasets["train"], batch_size=batch_size // world, num_workers=tcfg["num_workers"],
                            shuffle=tcfg["shuffle"], seed=seed, rank=rank, world_size=world,
                            start_samples=start_samples // world, pin_memory=device.type == "cuda",
                            name="train", item_keys=tcfg["item_keys"])

    def make_context(name: str, step: int) -> EvalContext:
        signals.leave_validation_if_requested()  # called before each evaluator: a stop skips the rest
        return EvalContext(networks=trainer.eval_networks(use_ema=True), datasets=datasets,
                           out_dir=run_dir / "val" / str(step) / name, step=step, device=device,
                           autocast=trainer.autocast, compute_losses=trainer.compute_losses, rank=rank,
                           world_size=world, all_reduce_sum=dist.all_reduce_sum if dist else (lambda t: t),
                           config=cfg)

    # The run starts here: from now on the run folder is written.
    if on_start is not None:
        on_start()
    if rank == 0:
        for note in ckpt.clean_interrupted_saves(run_dir):
            log.info("%s", note)
    validation = Validation(evaluators, make_context)
    loop = TrainLoop(cfg, run_dir, trainer, make_loader, validation, dist, datasets["train"], signals)
    try:
        loop.run()
        if dist:  # rank 0 may still be writing its last checkpoint: leave the group together, not one by one
            dist.barrier()
    finally:
        if dist:
            dist.shutdown()
