"""Every command and YAML block in README.md runs as written, or says plainly what it needs.

Commands are read from the README's ``bash`` blocks (continuation lines joined, comments kept apart):

* ``codes/train.py`` (and ``torchrun ... codes/train.py``): ``--list``/``--describe``/``--print-config``/``--validate``
  run as written; a training command is run with ``--validate`` (training itself is ``test_recipes.py``'s job, with
  tiny overrides). A command whose comment says "needs" must fail that validation for a missing file, so that the
  mark is true, and every other must pass.
* ``codes/test.py`` and ``codes/process_video.py``: run as written, in a folder holding a tiny trained
  ``experiments/quickstart_sr`` (the recipe with tiny overrides) and the images and clip the commands name.
* ``scripts/*.py``: the arguments are parsed by the script's own parser (its ``main`` is stopped there unless the
  command is marked runnable with ``--validate``), so a renamed flag fails here.
* The plugin example (the Python and YAML blocks of "Writing a plugin") is written to files verbatim and trained.

The walk-throughs of the family pages (docs/dvae.md, dalle.md, diffusion.md, switched.md) get the same checks,
except that a training step there may fail by naming a file an earlier step makes.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dlas.cli import test as dlas_test
from dlas.cli.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TINY_QUICKSTART = ["datasets.train.paths=['skimage:astronaut,coffee']", "datasets.train.batch_size=2",
                   "datasets.train.num_workers=0", "datasets.val.paths=[skimage:chelsea]", "networks.generator.nf=8",
                   "networks.generator.num_conv=2", "train.niter=2", "logger.print_freq=1"]


def blocks(language: str, text: str = README) -> list[tuple[str, str]]:
    """``(heading, text)`` of every fenced block of ``language``, with the section heading above it."""
    found, heading = [], ""
    for part in re.split(r"(^```[a-z]*\n.*?^```\n)", text, flags=re.S | re.M):
        if part.startswith(f"```{language}\n"):
            found.append((heading, part[len(language) + 4:-4]))
        elif not part.startswith("```"):  # a comment line inside another block is no heading
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            heading = headings[-1] if headings else heading
    return found


def commands(text: str = README) -> list[tuple[str, list[str], str]]:
    """``(section, argv, comment)`` of every command line of the bash blocks."""
    out = []
    for heading, block in blocks("bash", text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            code, _, comment = line.partition("  #")
            if code.strip() and not code.lstrip().startswith("#"):
                out.append((heading, shlex.split(code), comment.strip()))
    return out


def split_chain(argv: list[str]) -> list[list[str]]:
    """``a && b`` as two commands."""
    parts, current = [], []
    for word in argv:
        if word == "&&":
            parts.append(current)
            current = []
        else:
            current.append(word)
    return parts + [current]


ALL = [(section, argv, comment) for section, line, comment in commands() for argv in split_chain(line)]
KNOWN = ("python", "pip", "torchrun", "dlas-test", "dlas-train", "tensorboard")


def test_every_command_is_one_this_test_knows():
    assert len(ALL) > 20
    for section, argv, _ in ALL:
        assert argv[0] in KNOWN, f"README ({section}): a command this test does not check: {' '.join(argv)}"
        if argv[0] == "python":  # the test command itself, or one that a test below runs or parses
            assert argv[1:3] == ["-m", "pytest"] or argv[1] in ("codes/train.py", "codes/test.py",
                                                                "codes/process_video.py") \
                or argv[1].startswith("scripts/"), f"README ({section}): unchecked command {' '.join(argv)}"


def train_commands() -> list[tuple[list[str], str]]:
    found = []
    for _, argv, comment in ALL:
        if "codes/train.py" in argv:
            found.append((argv[argv.index("codes/train.py") + 1:], comment))
        elif argv[0] == "dlas-train":
            found.append((argv[1:], comment))
    return found


@pytest.mark.parametrize("args,comment", train_commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_train_commands_validate_or_say_what_they_need(args, comment, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no VGG weights in the cache: as on a fresh machine
    meta = {"--list", "--describe", "--print-config", "--validate"} & set(args)
    code = train_main(args if meta else [*args, "--validate"])
    err = capsys.readouterr().err
    if "needs" in comment:  # on a fresh machine it fails, naming what is missing (here it may have been made)
        assert code == 0 or (code == 2 and ("does not exist" in err or "not found" in err)), (args, err)
    else:
        assert code == 0, (args, err)


def test_torchrun_commands_name_a_config_that_validates(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    runs = [argv for _, argv, _ in ALL if argv[0] == "torchrun"]
    assert runs
    for argv in runs:
        assert train_main([*argv[argv.index("codes/train.py") + 1:], "--validate"]) == 0, capsys.readouterr().err


def test_pip_commands_name_extras_that_setup_py_defines():
    setup = (REPO / "setup.py").read_text()
    extras = set(re.findall(r'^\s+"(\w+)": \[', setup, flags=re.M))
    named = [m for _, argv, _ in ALL if argv[0] == "pip" for word in argv for m in re.findall(r"\.\[([\w,]+)\]", word)]
    assert named
    for group in named:
        assert set(group.split(",")) <= extras | {"test"}, group


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once a script's arguments parsed."""


def parse_only(monkeypatch, main, argv: list[str]) -> None:
    """Run ``main(argv)`` only as far as its argument parsing (a bad flag is argparse's exit 2)."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    with pytest.raises(_Parsed):
        if inspect.signature(main).parameters:
            main(argv)
        else:  # a benchmark's main() reads sys.argv
            monkeypatch.setattr(sys, "argv", ["script", *argv])
            main()


def script_commands() -> list[list[str]]:
    return [argv[1:] for _, argv, _ in ALL if argv[0] == "python" and argv[1].startswith("scripts/")]


@pytest.mark.parametrize("argv", script_commands(), ids=lambda v: " ".join(v[:2]))
def test_script_commands_parse_with_the_scripts_own_flags(argv, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    spec = importlib.util.spec_from_file_location(f"readme_{Path(argv[0]).stem}", REPO / argv[0])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    monkeypatch.syspath_prepend(str(REPO / argv[0].rsplit("/", 1)[0]))
    spec.loader.exec_module(module)
    if "--validate" in argv:  # cheap as written: run it
        assert module.main(argv[1:]) == 0, capsys.readouterr().err
    else:
        parse_only(monkeypatch, module.main, argv[1:])


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A working folder as the README's "Using a trained model" assumes: a (tiny) trained quickstart run, photos/,
    lr/ + hr/ (x4 references), big.png and clip.mp4."""
    import cv2

    from dlas.inference import save_image

    root = tmp_path_factory.mktemp("user")
    assert train_main(["-opt", str(REPO / "options" / "quickstart_sr.yml"), *TINY_QUICKSTART,
                       f"path.root={root / 'experiments'}"]) == 0
    rng = np.random.default_rng(0)
    for i in range(2):
        lr = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
        save_image(root / "photos" / f"p{i}.png", lr)
        save_image(root / "lr" / f"im{i}.png", lr)
        save_image(root / "hr" / f"im{i}.png", rng.integers(0, 256, (48, 56, 3), dtype=np.uint8))
    save_image(root / "big.png", rng.integers(0, 256, (40, 44, 3), dtype=np.uint8))
    writer = cv2.VideoWriter(str(root / "clip.mp4"), cv2.VideoWriter_fourcc(*"MJPG"), 12.0, (16, 16))
    for i in range(3):
        writer.write(np.full((16, 16, 3), 40 * i, np.uint8))
    writer.release()
    return root


def inference_commands() -> list[list[str]]:
    return [argv[1:] for _, argv, _ in ALL if argv[0] == "python" and argv[1] in ("codes/test.py",
                                                                                  "codes/process_video.py")]


@pytest.mark.parametrize("argv", inference_commands(), ids=lambda v: " ".join(v[:4]))
def test_inference_commands_run_as_written_after_the_quickstart(argv, user_folder, monkeypatch, capsys):
    monkeypatch.chdir(user_folder)
    if argv[0] == "codes/test.py":
        main = dlas_test.main
    else:
        spec = importlib.util.spec_from_file_location("readme_process_video", REPO / argv[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        main = module.main
    assert main(argv[1:]) == 0, capsys.readouterr().err
    output = Path(argv[argv.index("--output") + 1])
    assert output.exists() and (output.is_file() or any(output.iterdir()))
    if "--metrics" in argv:
        assert "psnr_bicubic" in capsys.readouterr().out


def test_dlas_test_commands_parse_with_dlas_tests_flags(monkeypatch):
    for _, argv, _ in ALL:
        if argv[0] == "dlas-test":
            parse_only(monkeypatch, dlas_test.main, argv[1:])


def test_the_plugin_example_trains_as_written(tmp_path, monkeypatch, capsys):
    section = [text for heading, text in blocks("python") if heading == "Writing a plugin"]
    yaml_blocks = [text for heading, text in blocks("yaml") if heading == "Writing a plugin"]
    assert len(section) == 1 and len(yaml_blocks) == 1
    (tmp_path / "my_plugin.py").write_text(section[0])
    (tmp_path / "my_run.yml").write_text(yaml_blocks[0])
    shutil.copytree(REPO / "options", tmp_path / "options")  # `base: options/quickstart_sr.yml`, as in the repo
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_plugin", raising=False)
    assert train_main(["-opt", "my_run.yml", "--validate"]) == 0, capsys.readouterr().err
    assert train_main(["-opt", "my_run.yml", *TINY_QUICKSTART[:4], "train.niter=1"]) == 0, capsys.readouterr().err
    config = (tmp_path / "experiments" / "my_run" / "config.yml").read_text()
    assert "type: tiny_sr" in config and "num_conv" not in config.split("networks:")[1].split("steps:")[0]


# The family pages' walk-throughs: each step's command exists as written. A step may need what the steps before it
# made (a run, its tokens), so a training command there may only fail by naming a missing file.
WALK_THROUGHS = [(page, argv) for page in ("dvae.md", "dalle.md", "diffusion.md", "switched.md")
                 for _, line, _ in commands((REPO / "docs" / page).read_text()) for argv in split_chain(line)]


@pytest.mark.parametrize("page,argv", WALK_THROUGHS, ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_family_walk_through_commands_exist_as_written(page, argv, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    if argv[:2] == ["python", "codes/train.py"]:
        code = train_main([*argv[2:], "--validate"])
        err = capsys.readouterr().err
        assert code == 0 or (code == 2 and ("does not exist" in err or "not found" in err)), (page, argv, err)
    elif argv[0] == "dlas-test":
        parse_only(monkeypatch, dlas_test.main, argv[1:])
    else:
        assert argv[0] == "python" and argv[1].startswith("scripts/"), (page, argv)
        spec = importlib.util.spec_from_file_location(f"walk_{Path(argv[1]).stem}", REPO / argv[1])
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        monkeypatch.syspath_prepend(str(REPO / argv[1].rsplit("/", 1)[0]))
        spec.loader.exec_module(module)
        parse_only(monkeypatch, module.main, argv[2:])
