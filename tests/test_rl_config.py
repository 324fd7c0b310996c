"""Run config: YAML + dotted overrides; bad keys/values fail before anything starts."""
import subprocess
import sys

import pytest

from rl.config import ConfigError, load_run_config
from tests_paths import ROOT

CONFIGS = ["grpo_arith_tiny", "ppo_arith_tiny", "grpo_code_tiny", "grpo_gsm8k_ring_mini"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load(name):
    cfg = load_run_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.name == name


def test_overrides_apply():
    cfg = load_run_config(ROOT / "configs/grpo_arith_tiny.yaml", ["trainer.zero_stage=3", "algo.name=ppo",
                                                                    "rollout.engine.max_num_seqs=7"])
    assert cfg.trainer.zero_stage == 3 and cfg.algo.name == "ppo" and cfg.rollout.engine["max_num_seqs"] == 7


@pytest.mark.parametrize("override,message", [
    ("trainer.zero_stag=3", "unknown key 'trainer.zero_stag'"),
    ("trainer.zero_stage=5", "trainer.zero_stage: Input should be 1, 2 or 3"),
    ("algo.name=foo", "algo.name"),
    ("rollout.n_samples=0", "rollout.n_samples"),
    ("alignment.on_drift=explode", "alignment.on_drift"),
    ("bogus=1", "unknown key 'bogus'"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_run_config(ROOT / "configs/grpo_arith_tiny.yaml", [override])


def test_bad_yaml_names_line(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\nmodel: {path: a\n")
    with pytest.raises(ConfigError, match="line"):
        load_run_config(tmp_path / "c.yaml")


def test_cli_fails_before_starting_anything():
    proc = subprocess.run([sys.executable, "-m", "rl.train", "--config", "configs/grpo_arith_tiny.yaml",
                           "trainer.zero_stage=9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "trainer.zero_stage" in proc.stderr
    assert "Started a local Ray" not in proc.stderr + proc.stdout


def test_ring_mini_dry_run_plans_placement():
    proc = subprocess.run([sys.executable, "-m", "rl.cli", "train", "--config", "configs/grpo_gsm8k_ring_mini.yaml",
                           "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '"role": "rollout"' in proc.stdout and "ZeRO-3" in proc.stdout
