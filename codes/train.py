"""Train a model from a YAML config: ``python codes/train.py -opt options/x.yml [key.path=value ...]``.

A thin entry point for use without installing; the installed command is ``dlas-train``. All logic lives in
:mod:`dlas.cli.train`.
"""
import sys
from pathlib import Path

# The one place a path is added: this script's own folder, so the `dlas` package next to it is the one imported
# (an installed copy elsewhere must not shadow the checkout being run).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlas.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
