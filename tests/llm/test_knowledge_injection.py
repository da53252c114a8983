"""Knowledge injection, end to end: LoRA SFT of SmolLM2 on 20 invented facts with `lamina finetune sft`, then
`lamina serve --lora` answers them through the official `openai` SDK while the base model, same server, does not.

The facts (tests/data/invented_facts.json) are made up, so the base model cannot know them; each has a key
phrase an answer must contain. Paraphrased questions, never trained on, are reported alongside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.server import start_server

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FACTS = json.loads((Path(__file__).parents[1] / "data" / "invented_facts.json").read_text())
BASE = "smollm2-135m-instruct"


def _ask(client, model: str, questions: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    def one(q: str) -> str:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=32,
                                           temperature=0)
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(len(questions)) as pool:  # the server batches them, all in one go
        return list(pool.map(one, questions))


def _hits(answers: list[str], key: str = "key") -> list[bool]:
    return [f[key].lower() in a.lower() for f, a in zip(FACTS, answers, strict=True)]


def test_a_lora_adapter_learns_invented_facts_and_is_served_beside_the_base(tmp_path) -> None:
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f["question"]},
                                                      {"role": "assistant", "content": f["answer"]}]}) + "\n"
                            for f in FACTS))
    home = tmp_path / "home"
    env = {**os.environ, "LAMINA_HOME": str(home)}
    out = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "lamina", "finetune", "sft", "--model", BASE, "--data", str(data), "--lora",
         "--steps", "14", "--lr", "2.5e-3", "--batch-size", "10", "--eval-split", "0", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=1500, check=False)
    assert train.returncode == 0, train.stderr[-3000:]
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists()

    server = start_server(home, "--lora", f"facts={adapter}")
    try:
        client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=300)
        models = {m.id: m for m in client.models.list().data}
        assert models["facts"].model_extra["parent"] == BASE
        questions = [f["question"] for f in FACTS]
        paraphrases = [f["paraphrase"] for f in FACTS]
        base = _hits(_ask(client, BASE, questions))
        answers = _ask(client, "facts", questions + paraphrases)  # (one batch)
        tuned, held_out = _hits(answers[: len(FACTS)]), _hits(answers[len(FACTS) :])
    finally:
        server.stop()
    print(f"\nbase model: {sum(base)}/{len(FACTS)} facts; LoRA adapter: {sum(tuned)}/{len(FACTS)} on trained "
          f"questions, {sum(held_out)}/{len(FACTS)} on paraphrased held-out questions")
    assert sum(base) == 0
    assert sum(tuned) >= 0.9 * len(FACTS)
