"""Fine-tuning and pretraining share one training vocabulary; runs saved under TuneArgs' old names still read."""

from __future__ import annotations

import dataclasses

import pytest

from lamina.errors import ConfigError
from lamina.foundation.train_config import OptimArgs, TrainArgs
from lamina.llm.tuning.base import LEGACY_KEYS, TuneArgs


def test_the_shared_fields_have_one_name_in_both_loops() -> None:
    shared = {f.name for f in dataclasses.fields(OptimArgs)}
    assert shared <= {f.name for f in dataclasses.fields(TrainArgs)}
    assert shared == {f.name for f in dataclasses.fields(TuneArgs)}
    assert set(LEGACY_KEYS.values()) <= shared


def test_min_lr_none_decays_to_a_tenth_of_lr() -> None:
    assert TuneArgs(lr=5e-3).final_lr == 5e-3 * 0.1
    assert TuneArgs(lr=5e-3, min_lr=1e-4).final_lr == 1e-4
    assert TrainArgs().final_lr == TrainArgs().min_lr


def test_old_key_names_read_as_the_new_ones() -> None:
    old = {"steps": 40, "lr": 1e-3, "batch_size": 8, "grad_accum": 2, "warmup": 3, "min_lr_ratio": 0.2,
           "weight_decay": 0.0, "grad_clip": 1.0, "log_every": 1, "eval_every": 20, "save_every": 10, "seed": 5,
           "dtype": "float32"}  # a checkpoint's state["args"] before the rename
    args = TuneArgs.from_dict(old)
    assert args == TuneArgs(max_steps=40, lr=1e-3, micro_batch_size=8, grad_accum=2, warmup_steps=3, min_lr=2e-4,
                            log_interval=1, eval_interval=20, save_interval=10, seed=5, dtype="float32")
    assert TuneArgs.from_dict(dataclasses.asdict(args)) == args  # and what is saved now reads back the same


def test_bad_saved_arguments_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="both 'steps' and its new name 'max_steps'"):
        TuneArgs.from_dict({"steps": 4, "max_steps": 4})
    with pytest.raises(ConfigError, match=r"unknown TuneArgs keys \['stepz'\]"):
        TuneArgs.from_dict({"stepz": 4})
    with pytest.raises(ConfigError, match=r"max_steps must be >= 1 \(got 0\)"):
        TuneArgs(max_steps=0)
    with pytest.raises(ConfigError, match=r"train.min_lr must be in \(0, lr=0.001\]"):
        TrainArgs(min_lr=0.01)
