"""The malformed-config corpus: `train.py -opt BAD --validate` exits 2 with the dotted path and a useful message.

Each file in tests/configs/bad/ breaks one thing (its first line says what); most take the valid
tests/configs/good/tiny.yml as their base. The components they name are the stand-ins of
tests/plugins/config_components.py, so the corpus does not depend on the built-in components.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "configs" / "bad"

# file -> (dotted path reported, message fragment, line in that file or None)
EXPECTED = {
    "bad_yaml_syntax": ("tests/configs/bad/bad_yaml_syntax.yml", "invalid YAML", 5),
    "base_cycle": ("base", "cycle: tests/configs/bad/base_cycle.yml -> tests/configs/bad/parts/cycle_other.yml "
                           "-> tests/configs/bad/base_cycle.yml", None),
    "batch_size_string": ("datasets.train.batch_size", "expected integer, got string '16'", 5),
    "dataset_option_typo": ("datasets.train.lenght", "did you mean 'length'", 5),
    "device_bad": ("device", "must be one of 'auto', 'cpu', 'cuda'", 3),
    "duplicate_key": ("train.niter", "duplicate key (first defined on line 4)", 5),
    "ema_rate_range": ("train.ema.rate", "between 0 and 1", 4),
    "ema_unknown_network": ("train.ema.networks[0]", "no network named 'gen'", 4),
    "eval_option_typo": ("eval.psnr.crop_boarder", "did you mean 'crop_border'", 5),
    "frozen_bad_key": ("networks.generator.frozen.aftr", "did you mean 'after'", 5),
    "gate_before_after": ("steps.generator.losses.pix.before", "greater than 'after: 100'", 6),
    "injector_option_typo": ("steps.generator.injectors.gen.grda", "did you mean 'grad'", 7),
    "graph_unproduced_key": ("steps.generator.losses.pix", "reads state key 'hr', which nothing produces", 6),
    "graph_unreached_network": ("steps.generator.training[1]", "none of its losses depends on it", 7),
    "logger_not_mapping": ("logger", "expected a mapping, got a list", 3),
    "logger_typo": ("logger.print_frq", "did you mean 'print_freq'", 4),
    "loss_option_typo": ("steps.generator.losses.pix.criterrion", "did you mean 'criterion'", 7),
    "loss_weight_typo": ("steps.generator.losses.pix.wieght", "did you mean 'weight'", 7),
    "missing_base": ("base", "base file '../good/no_such_file.yml' not found", 2),
    "missing_name": ("name", "required key is missing", None),
    "missing_niter": ("train.niter", "required key is missing", 3),
    "missing_optimizer": ("steps.critic.optimizer", "required key is missing", 4),
    "missing_plugin": ("imports[1]", "cannot import plugin module 'no_such_plugin_module'", 3),
    "missing_training": ("steps.critic.training", "required key is missing", 4),
    "missing_type": ("networks.critic", "missing 'type:'", 4),
    "network_option_bad_choice": ("networks.generator.act", "got 'relu6' (did you mean 'relu'?)", 5),
    "network_option_typo": ("networks.generator.nff", "did you mean 'nf'", 5),
    "network_option_wrong_type": ("networks.generator.nf", "expected integer, got string 'four'", 5),
    "niter_not_int": ("train.niter", "expected integer, got string '10k'", 4),
    "niter_zero": ("train.niter", "must be at least 1, got 0", 4),
    "optimizer_lr_negative": ("steps.generator.optimizer.lr", "must be > 0 (a learning rate), got -0.0002", 5),
    "seed_beyond_64_bits": ("seed", "must fit in 64 bits", 3),
    "loss_weight_nan": ("steps.generator.losses.pix.weight", "must be a number, got NaN", 6),
    "yaml_alias_bomb": ("tests/configs/bad/yaml_alias_bomb.yml", "expands to more than 100000 values", None),
    "no_train_dataset": ("datasets.train", "training needs a dataset named 'train'", 3),
    "optimizer_option_typo": ("steps.generator.optimizer.lrr", "did you mean 'lr'", 6),
    "path_typo": ("path.strict_lod", "did you mean 'strict_load'", 4),
    "precision_typo": ("precision", "did you mean 'bf16'", 3),
    "pretrain_unknown_network": ("path.pretrain_model_generatr", "did you mean 'generator'", 4),
    "scheduler_option_typo": ("train.lr_scheduler.gama", "did you mean 'gamma'", 5),
    "shuffle_not_bool": ("datasets.train.shuffle", "expected boolean or null, got string 'maybe'", 5),
    "top_level_list": ("tests/configs/bad/top_level_list.yml", "must be a mapping of sections", None),
    "top_level_typo": ("sed", "did you mean 'seed'", 3),
    "train_typo": ("train.nitre", "did you mean 'niter'", 4),
    "training_unknown_network": ("steps.generator.training[0]", "did you mean 'generator'", 5),
    "unknown_loss_type": ("steps.generator.losses.pix.type", "unknown loss type 'tiny_pxi' (did you mean 'tiny_pix'?)",
                          7),
    "unknown_network_type": ("networks.generator.type", "did you mean 'tiny_net'", 5),
    "unknown_tag": ("tests/configs/bad/unknown_tag.yml", "could not determine a constructor for the tag '!replcae'", 3),
    "weight_schedule_typo": ("steps.generator.losses.pix.weight.schedule", "did you mean 'linear'", 7),
}


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "plugins"), str(ROOT / "codes")]))
    return subprocess.run([sys.executable, "codes/train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_every_bad_config_has_an_expectation():
    assert sorted(p.stem for p in BAD.glob("*.yml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 25


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_config_exits_2_naming_path_and_problem(name):
    path, fragment, line = EXPECTED[name]
    result = run_train("-opt", f"tests/configs/bad/{name}.yml", "--validate")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [text for text in result.stderr.splitlines() if text.startswith("error: ")]
    matching = [text for text in error_lines if text.startswith(f"error: {path} ") or
                text.startswith(f"error: {path}:")]
    assert matching, f"no error names {path}:\n{result.stderr}"
    assert any(fragment in text for text in matching), result.stderr
    if line is not None:
        assert any(re.search(rf"[:( ]{line}\)", text) for text in matching), f"line {line} missing:\n{result.stderr}"


def test_three_errors_are_reported_at_once_with_their_lines():
    result = run_train("-opt", "tests/configs/three_errors.yml", "--validate")
    assert result.returncode == 2
    errors = [text for text in result.stderr.splitlines() if text.startswith("error: ")]
    assert len(errors) == 3, result.stderr
    file = "tests/configs/three_errors.yml"
    assert any(e.startswith(f"error: nmae ({file}:3): unknown key (did you mean 'name'?)") for e in errors)
    assert any(e.startswith(f"error: steps.generator.losses.pix.criterion ({file}:7): must be one of 'l1', 'l2'")
               for e in errors)
    assert any(e.startswith(f"error: train.niter ({file}:9): expected integer") for e in errors)


def test_the_base_of_the_corpus_is_valid_down_to_the_state_graph():
    result = run_train("-opt", "tests/configs/good/tiny.yml", "--validate")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK")
