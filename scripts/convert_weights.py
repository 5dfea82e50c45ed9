#!/usr/bin/env python
"""Convert a published weight file (BasicSR, Real-ESRGAN, the original ESRGAN release, a plain state dict, ...)
into this project's safetensors format.

    python scripts/convert_weights.py RRDB_ESRGAN_x4.pth rrdb_esrgan_x4.safetensors --network rrdbnet --nb 23
    python scripts/convert_weights.py net_g_latest.pth out.safetensors           # unwrap + strip prefixes only

With ``--network``, every further ``--option value`` is a constructor option of that network (YAML-typed, as in a
config), the file is converted to the network's key layout and loaded strictly (``--lenient`` loads what fits),
so the output is known to fit that network. Without it, the tensors are only unwrapped (``params_ema`` /
``params`` / ``state_dict`` / ``model``) and stripped of ``module.`` prefixes. Only tensors are read: a pickle
that would run code is refused. Exit code 2 on a bad file or mismatch, with one line saying why.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from dlas.errors import UserError
from dlas.registry import NETWORKS
from dlas.weights import extract_state_dict, load_network_weights, read_weights_file, save_network_weights


def parse_network_options(extra: list[str]) -> dict:
    """``["--nb", "23", "--scale", "2"]`` -> ``{"nb": 23, "scale": 2}`` (values parsed as YAML).

    Raises ValueError with a one-line reason for anything else.
    """
    options = {}
    if len(extra) % 2:
        raise ValueError(f"network options come in '--name value' pairs, got {' '.join(extra)}")
    for flag, value in zip(extra[::2], extra[1::2]):
        if not flag.startswith("--"):
            raise ValueError(f"network options come in '--name value' pairs: expected a --name before '{flag}'")
        try:
            options[flag[2:].replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            reason = str(exc).splitlines()[0]
            raise ValueError(f"network options come in '--name value' pairs with YAML values: {flag} {value!r} "
                             f"is not valid YAML ({reason})") from exc
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="weight file to read (.pth, .pt, .ckpt or .safetensors)")
    parser.add_argument("output", help="safetensors file to write")
    parser.add_argument("--network", help="registered network type to convert for (e.g. rrdbnet)")
    parser.add_argument("--lenient", action="store_true", help="load what fits instead of failing on a mismatch")
    args, extra = parser.parse_known_args(argv)
    try:
        if args.network:
            try:
                options = parse_network_options(extra)
            except ValueError as error:
                parser.error(str(error))  # exit code 2, like every bad argument
            net = NETWORKS.build({"type": args.network, **options}, path="network")
            report = load_network_weights(net, args.input, strict=not args.lenient)
            save_network_weights(net, args.output)
            print(f"{args.input} -> {args.output} ({args.network}): {report.summary()}")
        else:
            if extra:
                parser.error(f"network options {' '.join(extra)} need --network")
            state = extract_state_dict(read_weights_file(args.input), args.input)
            save_network_weights(state, args.output, metadata={"source": args.input})
            print(f"{args.input} -> {args.output}: {len(state)} tensors")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
