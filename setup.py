"""Installs the `dlas` package from codes/ with the `dlas-train` and `dlas-test` commands."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [line.strip() for line in (here / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

# Optional features, each imported only by the component that needs it; the test extra holds them all, so CI
# exercises every one of them.
optional = {
    "text": ["tokenizers>=0.15"],  # the triforce transformer's byte-level BPE
    "lmdb": ["lmdb>=1.4"],
    "shards": ["webdataset>=0.2.80"],
    "wandb": ["wandb>=0.16"],
    "onnx": ["onnx>=1.15", "onnxruntime>=1.16", "onnxscript>=0.1"],
}
extras = {**optional, "test": ["pytest>=7", "ruff>=0.5"] + sorted({p for pkgs in optional.values() for p in pkgs})}

setup(
    name="dlas",
    version="0.1.0",
    description="A YAML-config-driven PyTorch trainer for generative image models",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    package_dir={"": "codes"},
    packages=find_packages("codes"),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require=extras,
    entry_points={
        "console_scripts": [
            "dlas-train=dlas.cli.train:main",
            "dlas-test=dlas.cli.test:main",
        ]
    },
)
