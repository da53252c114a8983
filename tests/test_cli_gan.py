"""`lamina gan train|sample` and `lamina experiment digits` through click: tiny, in a temporary home."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lamina.cli import cli
from lamina.settings import get_settings


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The commands set torch's threads from LAMINA_THREADS; one is fastest for these tiny networks."""
    monkeypatch.setenv("LAMINA_THREADS", "1")
    get_settings.cache_clear()
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_train_then_sample(lamina_home: Path) -> None:
    result = invoke("gan", "train", "--steps", "20", "--run", "tiny")
    assert result.exit_code == 0, result.output
    run = lamina_home / "runs" / "gan" / "tiny"
    assert f"run folder     {run}" in result.output
    assert (run / "samples.png").is_file() and (run / "metrics.jsonl").is_file()

    result = invoke("gan", "sample", "--run", "tiny", "--digit", "7", "--n", "16")
    assert result.exit_code == 0, result.output
    assert (run / "digit-7.png").read_bytes().startswith(b"\x89PNG")
    assert str(run / "digit-7.png") in result.output
    out = lamina_home / "seven.png"
    assert invoke("gan", "sample", "--run", str(run), "--digit", "7", "--out", str(out)).exit_code == 0
    assert out.read_bytes().startswith(b"\x89PNG")

    result = invoke("gan", "train", "--steps", "20", "--run", "tiny")
    assert result.exit_code == 2
    assert "already holds a GAN trained for 20 steps: pass --resume" in result.output
    result = invoke("gan", "train", "--steps", "30", "--run", "tiny", "--resume")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--digit", "12"], "error: digit must be in 0..9 (got 12)"),
        (["--digit", "-1"], "error: digit must be in 0..9 (got -1)"),
        (["--digit", "3", "--n", "0"], "error: --n must be in 1..4096 (got 0)"),
    ],
)
def test_bad_sample_requests_get_one_line(lamina_home: Path, args: list[str], message: str) -> None:
    assert invoke("gan", "train", "--steps", "2", "--run", "r").exit_code == 0
    result = invoke("gan", "sample", "--run", "r", *args)
    assert result.exit_code == 2
    assert result.output.strip() == message


def test_sampling_an_untrained_run_says_to_train_first(lamina_home: Path) -> None:
    result = invoke("gan", "sample", "--digit", "7")
    assert result.exit_code == 2
    folder = lamina_home / "runs" / "gan" / "digits"
    expected = f"error: no trained generator in {folder}: run `lamina gan train --run digits` first"
    assert result.output.strip() == expected


def test_experiment_digits_writes_the_table(lamina_home: Path) -> None:
    result = invoke("experiment", "digits", "--seeds", "1", "--gan-steps", "20", "--classifier-steps", "40",
                    "--synthetic-per-class", "5", "--rounds", "1")
    assert result.exit_code == 0, result.output
    folder = lamina_home / "experiments" / "digits"
    assert "| supervised, 100 % labels | 1437 |" in result.output
    assert "[    0 s] seed 0: GAN, 20 steps on 143 labelled images" in result.output
    for name in ("results.md", "results.json", "results.png", "gan-seed0/samples.png"):
        assert (folder / name).is_file(), name

    result = invoke("experiment", "digits", "--label-fraction", "1.5")
    assert result.exit_code == 2
    assert result.output.strip() == "error: label_fraction must be in (0, 1), e.g. 0.1 (got 1.5)"
