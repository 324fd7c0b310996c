"""Reward plugins and the batch API: resolving names, `module:function` and `file.py:function`;
a plugin installed as a separate package found through the `lockstep.rewards` entry point;
broken plugins failing at config load with the plugin named; RewardConfig validation; and
`score_batch` weighting, metrics and per-item error isolation."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

import rewards
from rewards.batch import Component, RewardFn
from rewards.config import RewardConfig
from rewards.math import MathReward
from rewards.registry import RewardPluginError, available, register, resolve

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_MODULE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(solution_str.strip() == str(ground_truth)), "length": len(solution_str)}

def wrong_signature(text):
    return 1.0

def raises(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "boom":
        raise RuntimeError("plugin exploded")
    return 1.0
'''
ENTRY_POINTS = {
    "tiny_exact": "tiny_reward:compute_score",
    "tiny_bad_signature": "tiny_reward:wrong_signature",
    "tiny_raises": "tiny_reward:raises",
    "tiny_missing_attr": "tiny_reward:nope",
    "tiny_import_error": "tiny_reward_broken:compute_score",
}


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A real package with entry points, built and installed with pip into its own dir."""
    pkg = tmp_path_factory.mktemp("tiny_plugin_src")
    site = tmp_path_factory.mktemp("tiny_plugin_site")
    eps = "\n".join(f'{k} = "{v}"' for k, v in ENTRY_POINTS.items())
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "lockstep-tiny-reward"
        version = "0.1"
        [tool.setuptools]
        py-modules = ["tiny_reward", "tiny_reward_broken"]
        [project.entry-points."lockstep.rewards"]
        """) + eps + "\n")
    (pkg / "tiny_reward.py").write_text(PLUGIN_MODULE)
    (pkg / "tiny_reward_broken.py").write_text("import no_such_module_anywhere\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(pkg)],
                   check=True, capture_output=True, cwd=pkg)
    return site


@pytest.fixture
def with_plugin(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    return plugin_site


def call(fn, solution, gold="1", source="t", extra=None):
    return fn(data_source=source, solution_str=solution, ground_truth=gold, extra_info=extra)


def test_builtin_names_resolve():
    assert isinstance(rewards.get("math"), MathReward)
    fmt = rewards.get("format", preset="boxed")
    assert call(fmt, "x \\boxed{1}") == 1.0 and call(fmt, "1") == 0.0
    assert {i.name for i in available()} >= {"math", "code", "format", "length"}


def test_module_and_file_specs(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve("my_scores:compute_score")
    assert call(fn, "1")["score"] == 1.0
    fn = resolve(f"{tmp_path}/my_scores.py:compute_score")
    assert call(fn, "2")["score"] == 0.0
    monkeypatch.chdir(tmp_path)
    assert call(resolve("my_scores.py:compute_score"), "1")["score"] == 1.0


def test_kwargs_are_bound_and_checked(tmp_path, monkeypatch):
    (tmp_path / "kw_scores.py").write_text(
        "def score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):\n"
        "    return bonus\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert call(resolve("kw_scores:score", bonus=0.5), "x") == 0.5
    with pytest.raises(RewardPluginError, match="kw_scores:score.*does not take kwargs"):
        resolve("kw_scores:score", malus=1)


def test_register_in_process():
    register("always_half", lambda data_source, solution_str, ground_truth, extra_info: 0.5)
    assert call(rewards.get("always_half"), "x") == 0.5
    with pytest.raises(RewardPluginError, match="bad_register.*wrong signature"):
        register("bad_register", lambda x: x)


@pytest.mark.parametrize("spec, message", [
    ("no_such_reward", "no reward of that name"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("rewards.format:nothing_here", "has no attribute 'nothing_here'"),
    ("/nonexistent/dir/f.py:fn", "file not found"),
    ("json:dumps", "wrong signature"),
    ("rewards.format:FormatReward", None),
])
def test_bad_specs_name_the_plugin(spec, message):
    if message is None:
        resolve(spec)
        return
    with pytest.raises(RewardPluginError) as err:
        resolve(spec)
    assert spec in str(err.value) and message in str(err.value)


def test_file_plugin_that_raises_on_import(tmp_path):
    bad = tmp_path / "explodes.py"
    bad.write_text("raise RuntimeError('kaboom at import')\n")
    with pytest.raises(RewardPluginError, match="explodes.py:f.*kaboom at import"):
        resolve(f"{bad}:f")


def test_entry_point_plugin_is_found_by_name(with_plugin):
    fn = rewards.get("tiny_exact")
    assert call(fn, "7", "7")["score"] == 1.0
    infos = {i.name: i for i in available()}
    assert infos["tiny_exact"].source == "entry point (lockstep-tiny-reward)"
    assert infos["tiny_exact"].target == "tiny_reward:compute_score"


@pytest.mark.parametrize("name, message", [
    ("tiny_bad_signature", "wrong signature"),
    ("tiny_missing_attr", "failed to load"),
    ("tiny_import_error", "No module named 'no_such_module_anywhere'"),
])
def test_broken_entry_point_plugins_fail_at_config_load(with_plugin, name, message):
    with pytest.raises(ValidationError) as err:
        RewardConfig(rewards=[{"name": "math"}, {"name": name}])
    text = str(err.value)
    assert f"rewards[1] (name '{name}')" in text and message in text
    if name != "tiny_bad_signature":
        assert "lockstep-tiny-reward" in text  # the package is named too


def test_plugin_that_raises_on_one_item_scores_zero_and_is_counted(with_plugin):
    scorer = rewards.build([("tiny_raises", 1.0), ("tiny_exact", 2.0)], concurrency=4)
    items = [{"data_source": "t", "solution_str": s, "ground_truth": "ok"}
             for s in ["ok", "boom", "no"]]
    scores, metrics = scorer.score_batch(items)
    scorer.close()
    assert scores == [3.0, 0.0, 1.0]
    assert metrics["reward/tiny_raises/errors"] == 1
    assert metrics["reward/tiny_exact/errors"] == 0
    assert metrics["reward/tiny_exact/length"] == pytest.approx((2 + 4 + 2) / 3)
    assert metrics["reward/mean"] == pytest.approx(4 / 3)


def test_cli_lists_and_checks_an_installed_plugin(with_plugin, tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{with_plugin}{os.pathsep}{ROOT}")
    listing = subprocess.run([sys.executable, "-m", "rl.cli", "rewards", "list"], env=env,
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "tiny_exact" in listing.stdout and "lockstep-tiny-reward" in listing.stdout
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"solution_str": s, "ground_truth": "a"})
                              for s in ["a", "b", "a"]) + "\n")
    check = subprocess.run([sys.executable, "-m", "rl.cli", "rewards", "check", "tiny_exact",
                            "--data", str(data), "--json"], env=env, capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
    assert check.returncode == 0, check.stderr
    summary = json.loads(check.stdout)
    assert summary["rows"] == 3 and summary["mean"] == pytest.approx(2 / 3)
    bad = subprocess.run([sys.executable, "-m", "rl.cli", "rewards", "check",
                          "tiny_import_error", "--data", str(data)], env=env,
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "tiny_import_error" in bad.stderr


def test_config_validation_names_the_field():
    cases = [
        ({"rewards": [{"name": "math", "weight": "heavy"}]}, "rewards.0.weight"),
        ({"rewards": [{"name": "math", "spec": "a:b"}]}, "exactly one of 'name' or 'spec'"),
        ({"rewards": [{"name": "math", "wieght": 1}]}, "rewards.0.wieght"),
        ({"math": {"timeout_s": -1}}, "math.timeout_s"),
        ({"code": {"score_mode": "most"}}, "code.score_mode"),
        ({"concurrency": 0}, "concurrency"),
        ({"rewards": []}, "rewards"),
        ({"rewards": [{"name": "math", "kwargs": {"timeout_s": "soon"}}]}, "timeout_s"),
        ({"rewards": [{"name": "format", "kwargs": {"preset": "nope"}}]}, "format.preset"),
        ({"rewards": [{"name": "math"}, {"name": "math"}]}, "used twice"),
    ]
    for cfg, needle in cases:
        with pytest.raises(ValidationError) as err:
            RewardConfig(**cfg)
        assert needle in str(err.value), (cfg, str(err.value))


def test_sections_are_defaults_and_entry_kwargs_override():
    cfg = RewardConfig(math={"timeout_s": 1.5},
                       rewards=[{"name": "math"},
                                {"name": "math", "label": "math_slow",
                                 "kwargs": {"timeout_s": 9.0}}])
    (_, _, fast), (label, _, slow) = cfg.resolved()
    assert fast.cfg.timeout_s == 1.5 and slow.cfg.timeout_s == 9.0 and label == "math_slow"


def test_yaml_shaped_config_builds_a_working_scorer():
    cfg = RewardConfig.model_validate({
        "rewards": [{"name": "math", "weight": 1.0},
                    {"name": "format", "weight": 0.5, "kwargs": {"preset": "boxed"}},
                    {"name": "length", "weight": 1.0, "kwargs": {"max_length": 20,
                                                                  "buffer": 10}}],
        "concurrency": 4})
    scorer = rewards.RewardFn.from_config(cfg)
    items = [rewards.ScoreItem("gsm8k", "\\boxed{18}", "18"),
             rewards.ScoreItem("gsm8k", "#### 18", "18"),
             rewards.ScoreItem("gsm8k", "x" * 30 + "\\boxed{3}", "18")]
    scores, metrics = scorer.score_batch(items)
    scorer.close()
    assert scores == pytest.approx([1.5, 1.0, 0.5 - 1.0])
    assert metrics["reward/format/mean"] == pytest.approx(2 / 3)
    assert metrics["reward/math/timeouts"] == 0


def test_bad_return_values_are_errors_not_crashes():
    def nan(**_):
        return math.nan

    def no_score(**_):
        return {"value": 1}

    def text(**_):
        return "1.0"

    def fine(**_):
        return True

    scorer = RewardFn([Component(n, 1.0, f) for n, f in
                       [("nan", nan), ("no_score", no_score), ("text", text), ("fine", fine)]])
    scores, metrics = scorer.score_batch([{"solution_str": "x", "ground_truth": 1}])
    scorer.close()
    assert scores == [1.0]
    assert [metrics[f"reward/{n}/errors"] for n in ("nan", "no_score", "text", "fine")] == \
        [1, 1, 1, 0]


def test_score_items_must_have_the_verl_fields():
    scorer = rewards.build(["format"])
    with pytest.raises(ValueError, match="solution_str"):
        scorer.score_batch([{"ground_truth": 1}])
    scorer.close()
