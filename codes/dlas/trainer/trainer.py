"""ExtensibleTrainer: networks + a graph of optimizer steps, built from the config.

One iteration (:meth:`ExtensibleTrainer.train_step`): the batch is split into ``train.mega_batch_factor``
micro-batches, each seeding a *state* dict; every active step (in file order) runs its injectors and losses on
each micro-batch, accumulates gradients into the networks it trains, then applies one optimizer update. The
state persists across steps of the iteration, so the discriminator step can read what the generator step made.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from dlas.build import autocast, build_network, concrete_precision
from dlas.context import Context
from dlas.errors import ConfigError, Problem, UserError, did_you_mean
from dlas.trainer import fsdp
from dlas.trainer.ema import EMA
from dlas.trainer.schedules import Gate
from dlas.trainer.steps import Step

log = logging.getLogger("dlas")


def enable_checkpointing(net: torch.nn.Module, name: str) -> int:
    """Run the forward of ``net.checkpoint_modules()`` under activation checkpointing; returns how many.

    Networks without the protocol get their largest ``ModuleList``/``Sequential``'s children checkpointed. The
    patch is per instance, so nothing global changes and other instances of the class are unaffected.
    """
    modules = fsdp.block_modules(net)
    if not modules:
        raise ConfigError("network has no blocks to checkpoint (give it a checkpoint_modules() method)",
                          f"networks.{name}.checkpointing")
    for module in modules:
        forward = module.forward

        def checkpointed(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        module.forward = checkpointed
    return len(modules)


def compiled(net: torch.nn.Module, name: str, mode: Any) -> torch.nn.Module:
    """``net`` under ``torch.compile`` when its ``compile`` option asks for it (``true``/``default``,
    ``reduce-overhead``: CUDA graphs, ``max-autotune``), else ``net``.

    Whatever torch cannot compile (a graph break it cannot handle, a backend error) runs eagerly with torch's own
    warning instead of stopping the run; CUDA graphs are skipped, with torch's log line, where a graph has
    dynamic shapes or CPU tensors.
    """
    if not mode:
        return net
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # fall back to eager per frame (torch logs why)
    mode = None if mode in (True, "default") else mode
    log.info("networks.%s: torch.compile(mode=%s); the first steps are slow while it compiles", name, mode or "default")
    return torch.compile(net, mode=mode)


def split_batch(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split every tensor/list of ``batch`` along its first dimension into ``parts`` equal micro-batches."""
    if parts == 1:
        return [dict(batch)]
    sizes = {len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list, tuple))}
    size = sizes.pop() if len(sizes) == 1 else None
    if size is None or size % parts:
        raise ConfigError(f"a batch of {size} samples cannot be split into {parts} equal micro-batches",
                          "train.mega_batch_factor")
    m = size // parts
    return [{k: (v[i * m:(i + 1) * m] if isinstance(v, (torch.Tensor, list, tuple)) else v) for k, v in batch.items()}
            for i in range(parts)]


class ExtensibleTrainer:
    """Builds networks, steps and EMA from a resolved config (:func:`dlas.config.load_config` or
    :func:`dlas.config.resolve_config`: every default filled in) and runs training iterations."""

    def __init__(self, cfg: Mapping[str, Any], device: torch.device, dist: Any = None):
        self.cfg = cfg
        self.device = device
        train = cfg["train"]
        # auto (dlas.trainer.speed) is measured before the run's trainer is built; until then it means the defaults
        self.precision = concrete_precision(cfg["precision"])
        self.speed: Optional[dict[str, Any]] = None  # what auto chose, saved with each checkpoint
        self.autocast = autocast(self.precision, device)
        self.mega_batch_factor = train["mega_batch_factor"]
        self.strategy = train["distributed"] if dist is not None else None  # ddp | fsdp under torchrun
        self.iteration = 0  # completed iterations
        # NaN/Inf guard: consecutive and total skipped updates, kept on the device so that no step waits for the
        # host to learn whether it was finite (read them at print time)
        self.bad_steps = torch.zeros((), dtype=torch.long, device=device)
        self.bad_total = torch.zeros((), dtype=torch.long, device=device)

        self.networks: dict[str, torch.nn.Module] = {}
        self.frozen: dict[str, Any] = {}
        for name, ncfg in cfg["networks"].items():
            net = build_network(cfg, name, f"networks.{name}").to(device)
            if ncfg["channels_last"] is True:  # auto: contiguous until measured
                net = net.to(memory_format=torch.channels_last)
            self.networks[name] = net
            frozen = ncfg["frozen"]
            self.frozen[name] = Gate(frozen["after"], frozen["before"], None,
                                      f"networks.{name}.frozen") if isinstance(frozen, dict) else bool(frozen)
        self.steps = [Step.from_config(name, scfg) for name, scfg in cfg["steps"].items()]
        for step in self.steps:  # losses may hold modules or buffers (a VGG): they live where the data does
            for item in step.losses:
                item.loss.to(device)
        self._check_training_names()

        ema_cfg = train["ema"]
        self.ema: Optional[EMA] = None
        if ema_cfg:
            rates = ema_cfg["rate"] if isinstance(ema_cfg["rate"], list) else [ema_cfg["rate"]]
            names = ema_cfg["networks"] or [s for step in self.steps for s in step.training]
            names = [n for n in dict.fromkeys(names) if cfg["networks"][n]["ema"]]
            self.ema = EMA({n: self.networks[n] for n in names}, rates, ema_cfg["warmup"], ema_cfg["start"])

        # in config order, never set order: every rank must wrap (and broadcast) the networks in the same order
        trained = list(dict.fromkeys(n for step in self.steps for n in step.training))
        self.dist = dist
        # Checkpointing, sharding and compilation change how a network runs, not its weights: apply them after the
        # EMA copies are made so that the shadows stay plain modules (or, under FSDP, are sharded alike).
        self.sharded: list[str] = []
        for name, net in self.networks.items():
            if cfg["networks"][name]["checkpointing"]:
                enable_checkpointing(net, name)
        if self.strategy == "fsdp":
            self._shard([n for n in trained if self.frozen[n] is not True])
        self.runners: dict[str, torch.nn.Module] = {}
        for name, net in self.networks.items():
            self.runners[name] = compiled(net, name, cfg["networks"][name]["compile"])
        # DDP: only networks some step trains (and that are not frozen) are wrapped and all-reduced, and a step
        # calls the wrapper only for the networks it trains: the others run as plain modules.
        self.ddp: dict[str, torch.nn.Module] = {}
        if self.strategy == "ddp":
            self.ddp = {n: dist.wrap(self.runners[n]) for n in trained if self.frozen[n] is not True}
        self._gathered: dict[str, torch.nn.Module] = {}  # FSDP: full copies for validation, built once

        scheduler_default = train["lr_scheduler"]
        use_scaler = self.precision == "fp16"
        for step, scfg in zip(self.steps, cfg["steps"].values()):
            sched = scfg["lr_scheduler"] or scheduler_default
            sched_path = f"steps.{step.name}.lr_scheduler" if scfg["lr_scheduler"] else "train.lr_scheduler"
            step.build_optimizer(scfg["optimizer"], self.networks, sched, sched_path, use_scaler, device)
        self._disabled: list[torch.nn.Parameter] = []

    def _shard(self, names: list[str]) -> None:
        """FSDP: shard the trained networks and their EMA shadows in place (see :mod:`dlas.trainer.fsdp`)."""
        problem = fsdp.check_precision(self.precision)
        if problem:
            raise ConfigError(problem, "precision")
        for name in names:
            nets = [self.networks[name]] + ([s[name] for s in self.ema.shadows.values()]
                                            if self.ema and name in self.ema.sources else [])
            for net in nets:
                fsdp.shard(net, self.dist.world_size, self.dist.device_type, self.precision)
            self.sharded.append(name)

    # ------------------------------------------------------------------ graph checks
    def _check_training_names(self) -> None:
        problems = []
        for step in self.steps:
            for i, name in enumerate(step.training):
                if name not in self.networks:
                    problems.append(Problem(f"steps.{step.name}.training[{i}]", f"unknown network '{name}'"
                                            f"{did_you_mean(name, self.networks)}"))
        if problems:
            raise ConfigError(problems)

    def check_graph(self, dataset_keys: Iterable[str]) -> None:
        """Every key read is produced earlier; every trained network is reached by some loss of its step."""
        problems: list[Problem] = []
        available = set(dataset_keys)

        def check_component(path: str, component: Any) -> None:
            for key in component.reads:
                if key not in available:
                    problems.append(Problem(path, f"reads state key '{key}', which nothing produces before it "
                                            f"(available: {', '.join(sorted(available))})"))
            for net in component.networks:
                if net not in self.networks:
                    problems.append(Problem(path, f"uses unknown network '{net}'"))

        for step in self.steps:
            producers: dict[str, Any] = {}
            for item in step.injectors:
                check_component(f"steps.{step.name}.injectors.{item.name}", item.injector)
                producers.update({key: item.injector for key in item.injector.writes})
                available |= set(item.injector.writes)
            reached: set[str] = set()
            for item in step.losses:
                check_component(f"steps.{step.name}.losses.{item.name}", item.loss)
                reached |= set(item.loss.networks)
                frontier, seen = list(item.loss.reads), set()
                while frontier:  # the networks of every injector this loss depends on, transitively
                    key = frontier.pop()
                    if key in seen or key not in producers:
                        continue
                    seen.add(key)
                    reached |= set(producers[key].networks)
                    frontier += producers[key].reads
            for i, name in enumerate(step.training):
                if name not in reached:
                    problems.append(Problem(f"steps.{step.name}.training[{i}]", f"network '{name}' is trained by "
                                            "this step, but none of its losses depends on it"))
        for i, key in enumerate(self.cfg["logger"]["visuals"]):
            if key not in available:
                problems.append(Problem(f"logger.visuals[{i}]", f"no dataset or injector produces '{key}'"
                                        f"{did_you_mean(key, available)}"))
        if problems:
            raise ConfigError(problems)

    # ------------------------------------------------------------------ one iteration
    def is_frozen(self, name: str, iteration: int) -> bool:
        frozen = self.frozen[name]
        return frozen.active(iteration) if isinstance(frozen, Gate) else frozen

    def _set_trainable(self, trainable: set[str]) -> None:
        """Turn off gradients of networks a step does not train, remembering which ones to turn back on.

        Sharded (FSDP) networks keep theirs: FSDP swaps a module's parameter objects between their sharded and
        gathered forms, so a flag set on one form is lost on the other. Their gradients from a step that does not
        train them are cleared by the zero_grad of the step that does."""
        self._restore_grads()
        for name, net in self.networks.items():
            if name not in trainable and name not in self.sharded:
                params = [p for p in net.parameters() if p.requires_grad]
                for p in params:
                    p.requires_grad_(False)
                self._disabled += params

    def _restore_grads(self) -> None:
        for p in self._disabled:
            p.requires_grad_(True)
        self._disabled = []

    def context(self, iteration: int, training: bool = True, trainable: Iterable[str] = ()) -> Context:
        networks = dict(self.runners)
        networks.update({n: self.ddp[n] for n in trainable if n in self.ddp})
        return Context(networks=networks, iteration=iteration, training=training, device=self.device)

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Run one iteration on ``batch``; returns detached values to log (losses, grad norms, debug scalars)."""
        it = self.iteration + 1
        for net in self.networks.values():
            if not net.training:  # train() walks every submodule: only after validation switched it off
                net.train()
            if hasattr(net, "set_step"):
                net.set_step(it)
        states = split_batch(self.to_device(batch), self.mega_batch_factor)
        logs: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        for step in self.steps:
            if not step.gate.active(it):
                continue
            trainable = {n for n in step.training if not self.is_frozen(n, it)}
            self._set_trainable(trainable)
            ctx = self.context(it, trainable=trainable)
            step.zero_grad()
            finite = []
            for i, state in enumerate(states):
                with self._no_sync(trainable, last=i == len(states) - 1):
                    logged = step.forward_backward(state, ctx, len(states), self.autocast)
                for name, value in ctx.scalars.items():  # debug values: the mean over micro-batches
                    scalars[name] = scalars.get(name, 0) + torch.as_tensor(value).detach().float() / len(states)
                ctx.scalars.clear()
                finite += [v.float() for k, v in logged.items() if "/" not in k]
                for key, value in logged.items():
                    name = f"{step.name}/{key}"
                    logs[name] = logs.get(name, 0) + value.float() / len(states)
                for key, value in state.items():  # free the graph of this step; later steps see values only
                    if isinstance(value, torch.Tensor) and value.requires_grad:
                        state[key] = value.detach()
            losses_finite = torch.isfinite(torch.stack(finite)).all() if finite else torch.tensor(True)
            if self.dist is not None:  # a NaN on one rank must skip the update on every rank
                losses_finite = self.dist.all_true(losses_finite)
            norms, ok = step.optimize(losses_finite)
            logs[f"{step.name}/grad_norm"] = norms.pop("total").detach()
            logs.update({f"grad_norm/{net}": norm.detach() for net, norm in norms.items()})
            logs[f"skipped/{step.name}"] = (~ok).float()  # the window's mean: the fraction of updates skipped
            self.bad_steps = torch.where(ok, 0, self.bad_steps + 1)
            self.bad_total = self.bad_total + (~ok).long()
            if self.ema:
                self.ema.update(it, sorted(trainable), applied=ok)
        self._restore_grads()
        self._reshard()
        with warnings.catch_warnings():
            # a gated-off step's scheduler advances before its optimizer ever stepped; that is intended here
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            for step in self.steps:  # schedulers count iterations, so milestones are global step numbers
                if step.scheduler is not None:
                    step.scheduler.step()
        for name, value in scalars.items():
            logs[f"debug/{name}"] = value
        self.iteration = it
        self.last_state = states[0]  # for visuals: one micro-batch, not the whole batch's tensors
        return logs

    def _reshard(self) -> None:
        """FSDP keeps a network gathered after a forward that no backward followed (a ``grad: false`` injector, the
        dry run): give the memory back and put the sharded parameters (those the optimizer holds) in place."""
        for name in self.sharded:
            self.networks[name].reshard()

    def _no_sync(self, trainable: set[str], last: bool) -> contextlib.AbstractContextManager:
        """Suppress DDP's all-reduce (FSDP's reduce-scatter) on every micro-batch but the last, for every network
        of the step."""
        stack = contextlib.ExitStack()
        fsdp.set_gradient_sync([self.networks[n] for n in sorted(trainable) if n in self.sharded], last)
        if not last:
            for name in trainable:
                if name in self.ddp:
                    stack.enter_context(self.ddp[name].no_sync())
        return stack

    @torch.no_grad()
    def dry_run(self, batch: Mapping[str, Any]) -> None:
        """Run every injector and loss once on a real ``batch`` with all gates open, updating nothing.

        A shape mistake (a discriminator's ``input_size`` that is not the crop size, an LR patch too small for
        the translational loss) then stops the run at start with the component's dotted path, instead of at
        step 100001 when its gate opens. Networks run in eval mode (no data-dependent init, no BatchNorm
        statistics updated) and uncompiled.
        """
        modes = {name: net.training for name, net in self.networks.items()}
        for net in self.networks.values():
            net.eval()
        state = self.to_device(batch)
        ctx = Context(networks=self.networks, iteration=self.iteration + 1, training=False, device=self.device)
        try:
            for step in self.steps:
                parts = [(f"injectors.{i.name}", i.injector, True) for i in step.injectors]
                parts += [(f"losses.{i.name}", i.loss, False) for i in step.losses]
                for name, component, is_injector in parts:
                    try:
                        with self.autocast():
                            if is_injector:
                                state.update(component(state, ctx))
                            else:
                                component(state, ctx)
                    except (UserError, torch.OutOfMemoryError):
                        raise
                    except Exception as exc:  # a component that cannot run on this config's real data
                        raise ConfigError(f"fails on a real training batch ({type(exc).__name__}: {exc})",
                                          f"steps.{step.name}.{name}") from exc
        finally:
            self._reshard()
            for name, net in self.networks.items():
                net.train(modes[name])

    # ------------------------------------------------------------------ evaluation helpers
    def eval_networks(self, use_ema: bool = True) -> dict[str, torch.nn.Module]:
        """Networks for validation: each one's EMA (first rate) where it has one, in eval mode. Under FSDP a
        sharded network is gathered into a full copy on every rank (a collective), so evaluators run as without
        FSDP."""
        nets = {}
        for name, net in self.networks.items():
            nets[name] = self.ema.primary(name) if use_ema and self.ema and name in self.ema.sources else net
            if name in self.sharded:
                nets[name] = self._gather(name, nets[name])
            nets[name].eval()
        return nets

    def _gather(self, name: str, sharded: torch.nn.Module) -> torch.nn.Module:
        """A plain module holding the full weights of the sharded ``sharded`` (network ``name``)."""
        if name not in self._gathered:
            self._gathered[name] = build_network(self.cfg, name, f"networks.{name}").to(self.device)
        self._gathered[name].load_state_dict(fsdp.full_state_dict(sharded, everywhere=True))
        return self._gathered[name]

    @torch.no_grad()
    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """The training graph's losses on ``batch`` without any update (the ``loss`` evaluator)."""
        state = self.to_device(batch)
        ctx = self.context(self.iteration, training=False)
        if self.sharded:  # ranks evaluate different items: run full copies, not collectives
            ctx.networks = {**ctx.networks, **{n: self._gather(n, self.networks[n]) for n in self.sharded}}
        out: dict[str, float] = {}
        with self.autocast():
            for step in self.steps:
                step.run_injectors(state, ctx)
                _, logged = step.compute_losses(state, ctx)
                out.update({f"{step.name}/{k}": float(v) for k, v in logged.items() if "/" not in k})
        return out

    # ------------------------------------------------------------------ state
    def _load_weights(self, name: str, net: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
        if name in self.sharded:
            fsdp.load_full_state_dict(net, sd)
        else:
            net.load_state_dict(sd)

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Checkpoint files: ``NET`` and ``NET_ema[_RATE]`` -> state dict. Under FSDP every rank must call it (the
        sharded weights are gathered into full tensors on rank 0; the other ranks get empty dicts for them)."""
        files = {name: self._weights_of(name, net) for name, net in self.networks.items()}
        if self.ema:
            files.update({self.ema.file_stem(rate, name): self._weights_of(name, shadow)
                          for rate, shadows in self.ema.shadows.items() for name, shadow in shadows.items()})
        return files

    def _weights_of(self, name: str, net: torch.nn.Module) -> dict[str, torch.Tensor]:
        return fsdp.full_state_dict(net) if name in self.sharded else net.state_dict()

    def _step_networks(self, step: Step) -> dict[str, torch.nn.Module]:
        return {name: self.networks[name] for name in step.training}

    def state_dict(self) -> dict[str, Any]:
        """Optimizers, schedulers, scalers and counters (under FSDP every rank must call it: the optimizer state
        of sharded networks is gathered, keyed by parameter name)."""
        steps = {}
        for step in self.steps:
            steps[step.name] = step.state_dict()
            if any(name in self.sharded for name in step.training):
                steps[step.name]["optimizer"] = fsdp.optimizer_state_dict(self._step_networks(step), step.optimizer)
        return {
            "step": self.iteration,
            "bad_steps": int(self.bad_steps),
            "bad_total": int(self.bad_total),
            "ema_updates": self.ema.updates if self.ema else 0,
            "steps": steps,
            **({"speed": self.speed} if self.speed is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any], weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for name, net in self.networks.items():
            if name not in weights:
                raise ConfigError(f"the checkpoint has no weights for network '{name}'", f"networks.{name}")
            self._load_weights(name, net, weights[name])
        if self.ema:
            self.ema.load_state_dicts(weights, state.get("ema_updates", 0), load=self._load_weights)
        for step in self.steps:
            if step.name in state["steps"]:
                saved = state["steps"][step.name]
                if any(name in self.sharded for name in step.training):
                    fsdp.load_optimizer_state_dict(self._step_networks(step), step.optimizer, saved["optimizer"])
                    saved = {**saved, "optimizer": step.optimizer.state_dict()}
                step.load_state_dict(saved)
            else:
                log.warning("the checkpoint has no optimizer state for step '%s': it starts fresh", step.name)
        self.iteration = state["step"]
        self.bad_steps = torch.tensor(int(state.get("bad_steps", 0)), device=self.device)
        self.bad_total = torch.tensor(int(state.get("bad_total", 0)), device=self.device)
