"""``python codes/test.py --run experiments/NAME --input DIR --output DIR`` (same as ``dlas-test``)."""
import sys
from pathlib import Path

# The one allowed path edit: run from a checkout without `pip install -e .` (this folder holds `dlas`).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlas.cli.test import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
