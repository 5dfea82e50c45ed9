"""Encode a dataset with a trained dVAE run into token shards: the DALL-E transformer's training data.

    python scripts/extract_tokens.py --run experiments/triforce_dvae_shapes --output tokens/shapes_train
    python scripts/extract_tokens.py --run experiments/triforce_dvae_shapes --output tokens/shapes_holdout \\
        --set split=holdout --set "holdout=[red circle, blue square]" --set count=2000
    python scripts/extract_tokens.py --run experiments/triforce_dvae_photos256 --output tokens/photos \\
        --dataset train --set paths=[/data/captioned] --set crop=center

Each item of the dataset (by default the run's own ``datasets.train``; ``--dataset NAME`` another one of the
run's config, ``--set KEY=VALUE`` changes one of its options, YAML-typed) is encoded with the run's dVAE (its
newest checkpoint, EMA weights unless ``--no-ema``) into a token grid, stored with the item's caption, its
``path`` as the id, and its other string fields; the format is described in ``dlas/data/token_shards.py``.
Seeded datasets are read at the run's seed, epoch by epoch (``--epochs``: the shapes dataset draws new scenes
every epoch, a photo dataset another crop and caption); ``--limit`` stops after that many items.

Resumable: shards are written in item order and the manifest is rewritten after each one, so running the same
command again continues at the first unfinished shard (an interrupted shard is recomputed). A folder written
from another checkpoint or other data is refused. At the end the manifest records how many codes the tokens use
and their perplexity.

Exit codes: 0 done (or already complete); 2 a wrong or incomplete run folder, bad arguments or data; 130
interrupted (run it again to resume).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from dlas.build import RunNetworks, select_device
from dlas.config.schema import LOADER_KEYS
from dlas.data.collate import ItemCollator, wants_epoch_keys
from dlas.data.token_shards import TokenShards, TokenShardWriter
from dlas.errors import ConfigError, DataError, UserError
from dlas.registry import DATASETS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the dVAE's run folder (experiments/NAME)")
    parser.add_argument("--output", required=True, help="the token-shard folder to write (or to resume)")
    parser.add_argument("--network", help="the dVAE's name under networks: (default: the run's dvae network)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    parser.add_argument("--dataset", default="train", help="which of the run's datasets to encode (default train)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change an option of that dataset (YAML value), e.g. --set split=holdout")
    parser.add_argument("--key", default="hq", help="the item key holding the image (default hq)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over a seeded dataset (default 1)")
    parser.add_argument("--limit", type=int, help="encode at most this many items")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=4096, help="items per shard (default 4096)")
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    return args


def find_dvae(config: dict, name: str | None) -> str:
    """The network to encode with: ``name``, else the only (or first) network of type dvae."""
    networks = config.get("networks") or {}
    if name:
        return name
    found = [n for n, cfg in networks.items() if isinstance(cfg, dict) and cfg.get("type") == "dvae"]
    if not found:
        raise ConfigError(f"the run has no network of type dvae (it has {', '.join(networks) or 'none'}); "
                          "name one with --network", "--network")
    return found[0]


def dataset_config(config: dict, name: str, settings: list[str]) -> dict:
    """The run's ``datasets.NAME`` with each ``KEY=VALUE`` of ``settings`` applied (values parsed as YAML)."""
    datasets = config.get("datasets") or {}
    if name not in datasets:
        raise ConfigError(f"the run has no dataset '{name}'; it has {', '.join(datasets) or 'none'}", "--dataset")
    cfg = dict(datasets[name])
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"'{setting}' is not KEY=VALUE", "--set")
        try:
            cfg[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"'{value}' is not a YAML value: {exc}", "--set") from exc
    return cfg


def build_dataset(config: dict, name: str, cfg: dict) -> Any:
    dataset = DATASETS.build(cfg, f"datasets.{name}", reserved=LOADER_KEYS)
    if wants_epoch_keys(dataset):
        dataset.seed = config.get("seed", 0)
    return dataset


class Keys(torch.utils.data.Dataset):
    """The dataset read at a fixed list of keys (``(epoch, index)`` pairs or plain indices), from ``start`` on."""

    def __init__(self, dataset: Any, keys: list[Any]):
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.keys[i]]


def item_keys(dataset: Any, epochs: int, limit: int | None) -> list[Any]:
    if wants_epoch_keys(dataset):
        keys: list[Any] = [(epoch, index) for epoch in range(epochs) for index in range(len(dataset))]
    elif epochs > 1:
        raise ConfigError("this dataset is not seeded: every epoch would give the same items; leave --epochs at 1",
                          "--epochs")
    else:
        keys = list(range(len(dataset)))
    return keys[:limit] if limit is not None else keys


def records_of(batch: dict[str, Any], key: str, count: int) -> list[dict[str, str]]:
    """One record per item: ``id`` (its ``path``), ``caption`` ("" if none) and its other string fields."""
    strings = {name: values for name, values in batch.items()
               if name != key and isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values)}
    records = []
    for i in range(count):
        record = {"id": strings["path"][i] if "path" in strings else str(i),
                  "caption": strings["caption"][i] if "caption" in strings else ""}
        record.update({name: values[i] for name, values in strings.items() if name not in ("path", "caption")})
        records.append(record)
    return records


def token_statistics(folder: Path) -> dict[str, float]:
    """How many codes the folder's tokens use, and the perplexity (exp entropy) of their histogram."""
    counts = TokenShards(folder).code_histogram().double()
    p = counts[counts > 0] / counts.sum()
    return {"codes_used": int((counts > 0).sum()), "codebook_usage": float((counts > 0).double().mean()),
            "perplexity": math.exp(float(-(p * p.log()).sum()))}


def extract(args: argparse.Namespace) -> int:
    device = select_device(args.device, option="--device")
    networks = RunNetworks(args.run, step=args.step, ema=not args.no_ema, device=device)
    name = find_dvae(networks.config, args.network)
    loaded = networks.load(name)
    dvae = loaded.network
    if not all(hasattr(dvae, attr) for attr in ("encode", "codebook_size", "downsample")):
        raise ConfigError(f"network '{name}' ({type(dvae).__name__}) is not a discrete VAE: it needs encode(images), "
                          "codebook_size and downsample", "--network")
    dcfg = dataset_config(networks.config, args.dataset, args.set)
    dataset = build_dataset(networks.config, args.dataset, dcfg)
    keys = item_keys(dataset, args.epochs, args.limit)
    first = dataset[keys[0]]
    if not isinstance(first, dict) or not isinstance(first.get(args.key), torch.Tensor):
        found = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise DataError(f"the items have no image under '{args.key}' (they have {found}); pick one with --key",
                        f"datasets.{args.dataset}")
    height, width = first[args.key].shape[-2:]
    if height % dvae.downsample or width % dvae.downsample:
        raise DataError(f"the images are {width}x{height}, not a multiple of the dVAE's downsampling "
                        f"{dvae.downsample}; give the dataset a target size that is", f"datasets.{args.dataset}")
    info = {"grid": list(dvae.token_grid(height, width)), "codebook_size": int(dvae.codebook_size),
            "dvae": {"run": str(args.run), "network": name, "step": loaded.step, "weights": loaded.weights_file.name,
                     "type": networks.config["networks"][name].get("type"), "downsample": int(dvae.downsample),
                     "image_size": [int(height), int(width)]},
            "source": {"dataset_name": args.dataset, "dataset": dcfg, "seed": networks.config.get("seed", 0),
                       "epochs": args.epochs, "limit": args.limit, "key": args.key}}
    writer = TokenShardWriter(args.output, info, args.shard_size)
    if writer.complete:
        print(f"{args.output}: already complete ({writer.done} items); nothing to do")
        return 0
    if writer.done:
        print(f"{args.output}: resuming after {writer.done} of {len(keys)} items")
    loader = torch.utils.data.DataLoader(Keys(dataset, keys[writer.done:]), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=ItemCollator(args.dataset))
    with tqdm(total=len(keys), initial=writer.done, unit="img", desc="encoding", dynamic_ncols=True,
              disable=None) as progress:
        for batch in loader:
            images = batch[args.key].to(device)
            writer.add(dvae.encode(images), records_of(batch, args.key, images.shape[0]))
            progress.update(images.shape[0])
    writer.close()
    stats = token_statistics(Path(args.output))
    writer.annotate(stats=stats)
    print(f"{args.output}: {writer.done} items, {info['grid'][0]}x{info['grid'][1]} tokens each, "
          f"{stats['codes_used']} of {dvae.codebook_size} codes used, perplexity {stats['perplexity']:.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return extract(args)
    except UserError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; the finished shards are kept: run the same command again to resume ({args.output})",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
