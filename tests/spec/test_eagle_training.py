"""scripts/train_eagle_head.py end to end at tiny size: a head trained for a few steps on
a tiny random target (frozen, features on the fly) lowers its loss, saves the EAGLE-1
layout, loads in lanner, and its engine evaluation gives the plain run's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lanner.model.loader import load_model
from lanner.model.models.eagle import load_eagle_head
from tests.model.test_eagle_head import training_script

ROOT = Path(__file__).resolve().parents[2]


def test_training_script_trains_a_head_lanner_loads(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    target_dir = tiny_model_dirs["llama"]
    out_dir = tmp_path / "head"
    steps = 60
    report = training_script().main(
        [
            *("--target", str(target_dir), "--out-dir", str(out_dir), "--device", "cpu"),
            *("--time-budget", "600", "--max-steps", str(steps), "--reserve-s", "0"),
            *("--corpus-files", str(ROOT / "lanner/spec"), str(ROOT / "lanner/engine")),
            *("--seq-len", "64", "--max-train-tokens", str(64 * 24), "--batch-size", "4"),
            *("--ttt-steps", "2", "--lr", "3e-3", "--log-every", "1", "--eval-windows", "4"),
            *("--eval-prompts", "2", "--eval-prompt-tokens", "24", "--eval-output-tokens", "12"),
            *("--eval-ks", "2"),
        ]
    )
    log = report["training"]["log"]
    assert report["training"]["steps"] == steps and len(log) == steps
    first = sum(e["loss"] for e in log[:5]) / 5
    last = sum(e["loss"] for e in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    saved = json.loads((out_dir / "training_report.json").read_text())
    assert saved["heldout_teacher_forced"]["windows"] == 4
    rates = saved["heldout_teacher_forced"]["greedy_match_per_position"]
    assert len(rates) == 6 and all(0.0 <= r <= 1.0 for r in rates)
    evaluation = saved["engine_eval"]["per_k"]["2"]
    assert evaluation["same_tokens_as_without_speculation"] and evaluation["num_drafts"] > 0
    # The saved layout loads as lanner's head, sharing the target's embedding and LM head.
    target = load_model(target_dir, "float32", "cpu")
    head = load_eagle_head(out_dir, "eagle", target.model, torch.float32, torch.device("cpu"), 64)
    assert head.embed_tokens is None and head.lm_head is None


def test_the_corpus_split_does_not_depend_on_where_the_files_sit(tmp_path: Path) -> None:
    # The held-out files are picked by a seeded hash of each file's path below its
    # argument's folder: two copies of the same folders give the same split (keyed by
    # absolute paths, one clone held out an empty __init__.py and had nothing to
    # evaluate on).
    script = training_script()
    splits = []
    for copy in ("a", "b/deeper"):
        for name in ("spec", "engine"):
            source = ROOT / "lanner" / name
            for path in sorted(source.glob("*.py")):
                target = tmp_path / copy / name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(path.read_text())
        args = script.parse_args(
            ["--corpus-files", str(tmp_path / copy / "spec"), str(tmp_path / copy / "engine")]
        )
        splits.append(script.corpus_split(args))
    assert splits[0].heldout == splits[1].heldout and splits[0].train == splits[1].train
    assert splits[0].heldout and all(splits[0].heldout)


def test_texts_without_a_whole_window_are_refused_by_name(
    tiny_model_dirs: dict[str, Path],
) -> None:
    from transformers import AutoModelForCausalLM

    script = training_script()
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="no window of --seq-len tokens"):
        script.extract_features(target, iter([]), 4, 4, torch.device("cpu"), float("inf"))
