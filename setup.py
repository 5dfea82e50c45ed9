"""Installs the `dlas` package from codes/ with the `dlas-train` and `dlas-test` commands."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip() for line in (here / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")
]

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
    extras_require={"test": ["pytest>=7"]},
    entry_points={
        "console_scripts": [
            "dlas-train=dlas.cli.train:main",
            "dlas-test=dlas.cli.test:main",
        ]
    },
)
