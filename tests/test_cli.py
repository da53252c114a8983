"""The `lamina` command as users run it: a real process, real model weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def lamina(*args: str, stdin: str | None = None, home=None, timeout: int = 300) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    env = dict(os.environ)
    if home is not None:
        env["LAMINA_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "lamina", *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_generate_answers_paris(lamina_home) -> None:
    result = lamina("generate", "--temperature", "0", "What is the capital of France? Answer in one sentence.", home=lamina_home)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_repl_streams_keeps_history_and_resets(lamina_home) -> None:
    script = "What is the capital of France? Answer in one sentence.\nWhat did I just ask you?\n/reset\n/nonsense\n/exit\n"
    result = lamina("chat", "--temperature", "0", "--max-tokens", "40", stdin=script, home=lamina_home)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "(history cleared)" in result.stderr and "unknown command '/nonsense'" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "--max-tokens", "0", "hi"], "--max-tokens"),
        (["generate", "--temperature", "-1", "hi"], "use 0 for greedy"),
        (["generate", "--model", "no-such-model", "hi"], "available models: smollm2-135m-instruct"),
        (["generate", "--device", "tpu", "hi"], "use auto, cpu, cuda"),
        (["generate", "--dtype", "int3", "hi"], "use auto, float32, bfloat16 or float16"),
    ],
)
def test_bad_input_is_one_line_with_the_fix(lamina_home, args, expected) -> None:
    result = lamina(*args, home=lamina_home)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def test_info_and_models(lamina_home) -> None:
    info = lamina("info", home=lamina_home)
    assert info.returncode == 0, info.stderr
    for expected in ("torch 2.13.0", "threads", "dtype auto on cpu", str(lamina_home), "smollm2-135m-instruct"):
        assert expected in info.stdout
    from lamina.llm.kernels import native

    if native.unavailable_reason() is None:  # built into the machine cache (LAMINA_CACHE, else LAMINA_HOME/cache), and says where
        from lamina.settings import get_settings

        assert f"native CPU kernels: built for {native.isa()} ({get_settings().cache_for(lamina_home) / 'native'}" in info.stdout
        # the default model is a Q4_1 GGUF: served on its own blocks, and info says so and why
        assert "default precision for smollm2-135m-instruct: int4 (quantize auto: the GGUF's own Q4_1 blocks" in info.stdout
    models = lamina("models", home=lamina_home)
    assert models.returncode == 0, models.stderr
    assert "smollm2-135m-instruct" in models.stdout and "134.5M" in models.stdout and "llama" in models.stdout
    assert "all-minilm-l6-v2" in models.stdout and "bert" in models.stdout
