"""Train the byte-level BPE caption tokenizer of a DALL-E transformer on a dataset's captions.

    python scripts/train_tokenizer.py -opt options/triforce_dalle_shapes.yml [--dataset train] [key=value ...]
    python scripts/train_tokenizer.py --captions captions.txt --out tokenizers/mine.json

With ``-opt``, the captions are those of the config's dataset (``--dataset``, default ``train``; built as
training builds it, items read in index order, at most ``--max-items``) and the tokenizer is written where
the config's ``dalle`` network looks for it (its ``tokenizer:`` option), unless ``--out`` says otherwise.
``--captions FILE`` reads one caption per line instead (repeatable). The tokenizer is lowercasing (unless
``--keep-case``), at most ``--vocab-size`` ids (fewer when the captions have fewer pairs worth merging), ids 0
and 1 ``<pad>`` and ``<eot>``; the network saves it inside its weights, so a trained run keeps it.

Prints the vocabulary, the caption lengths in tokens and how many captions fit each caption length, and
checks the config's ``text_length`` and ``text_vocab_size`` against them. Exit codes: 0 done, 2 bad config,
data or arguments, 1 anything else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dlas import build
from dlas.config import load_config
from dlas.data.tokenizer import BYTES, describe, train_caption_tokenizer
from dlas.errors import ConfigError, DataError, UserError


def dataset_captions(cfg: dict[str, Any], name: str, max_items: int, key: str) -> list[str]:
    """The ``key`` strings of the first ``max_items`` items of the config's dataset ``name``."""
    if name not in cfg["datasets"]:
        raise ConfigError(f"no dataset '{name}'; the config has: {', '.join(cfg['datasets']) or 'none'}", "--dataset")
    dataset = build.build_datasets(cfg, [name])[name]
    captions = []
    for index in range(min(len(dataset), max_items)):
        item = dataset[index]
        if not isinstance(item, dict) or not isinstance(item.get(key), str):
            raise DataError(f"item {index} has no '{key}' string (use --caption-key)", f"datasets.{name}")
        captions.append(item[key])
    return captions


def file_captions(files: list[str]) -> list[str]:
    captions = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DataError("captions file does not exist", name)
        captions += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return captions


def dalle_network(cfg: dict[str, Any]) -> Optional[tuple[str, dict[str, Any]]]:
    """The config's first ``dalle`` network, as ``(name, options)``."""
    return next(((name, entry) for name, entry in (cfg.get("networks") or {}).items()
                 if isinstance(entry, dict) and entry.get("type") == "dalle"), None)


def report(tokenizer: Any, captions: list[str], network: Optional[tuple[str, dict[str, Any]]]) -> list[str]:
    """Print the summary; return warnings about the config's network options."""
    lengths = np.array(tokenizer.token_count(captions)) + 1  # + <eot>
    summary = describe(tokenizer)
    print(f"{len(captions)} captions ({len(set(captions))} distinct); vocabulary {summary['vocab_size']} ids "
          f"({summary['merges']} merges)")
    print(f"tokens per caption with <eot>: mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"99th percentile {np.percentile(lengths, 99):.0f}, max {lengths.max()}")
    print("captions fitting text_length: " + ", ".join(f"{n}: {100 * (lengths <= n).mean():.1f}%"
                                                       for n in (8, 16, 24, 32, 64, 128)))
    problems = []
    if network is not None:
        name, options = network
        length, vocab = options.get("text_length", 32), options.get("text_vocab_size", 1024)
        truncated = int((lengths > length).sum())
        if truncated:
            problems.append(f"networks.{name}.text_length is {length}: {truncated} of the captions "
                            f"({100 * truncated / len(captions):.1f}%) would be truncated; the longest needs "
                            f"{lengths.max()}")
        if tokenizer.vocab_size > vocab:
            problems.append(f"networks.{name}.text_vocab_size is {vocab}, below the tokenizer's "
                            f"{tokenizer.vocab_size} ids: raise it or train with --vocab-size {vocab}")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-opt", "--opt", metavar="FILE.yml", help="a config whose dataset holds the captions")
    parser.add_argument("--dataset", default="train", help="which entry of datasets: (default train)")
    parser.add_argument("--caption-key", default="caption", help="the items' caption key (default caption)")
    parser.add_argument("--max-items", type=int, default=100_000, help="captions read at most (default 100000)")
    parser.add_argument("--captions", action="append", metavar="FILE", help="a text file, one caption per line")
    parser.add_argument("--out", metavar="tokenizer.json", help="where to write (default: the config's dalle "
                                                                "network's tokenizer option)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="at most this many ids (default 1024)")
    parser.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)")
    parser.add_argument("--keep-case", action="store_true", help="do not lowercase the captions")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train.py")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if bool(args.opt) == bool(args.captions):
            raise ConfigError("give -opt CONFIG (its dataset's captions) or --captions FILE, one of them", "arguments")
        network = None
        if args.opt:
            cfg = load_config(args.opt, args.overrides, training=False)
            captions = dataset_captions(cfg, args.dataset, args.max_items, args.caption_key)
            network = dalle_network(cfg)
        else:
            captions = file_captions(args.captions)
        out = args.out or (network[1].get("tokenizer") if network else None)
        if not out or out == BYTES:
            raise ConfigError("say where to write the tokenizer with --out FILE (the config names no tokenizer "
                              "file for a dalle network)", "--out")
        if not captions:
            raise DataError("no captions to train on", args.opt or args.captions[0])
        tokenizer = train_caption_tokenizer(captions, args.vocab_size, args.min_frequency, not args.keep_case)
        problems = report(tokenizer, captions, network)
        tokenizer.save(out)
        print(f"wrote {out}")
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
        return 0
    except UserError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
