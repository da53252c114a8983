"""Pretraining: schedule, a real (tiny) run end to end, exact resume after kill -9, DDP/FSDP vs 1 process."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lamina.foundation.train import lr_at

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny",
    "data": {"dataset": "pydoc", "val_fraction": 0.1, "seed": 7},
    "tokenizer": {"vocab_size": 384},
    "model": {"family": "gpt2", "n_layers": 2, "n_heads": 2, "dim": 64, "bias": False},
    "train": {"max_steps": 40, "micro_batch_size": 8, "block_size": 64, "lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 4,
              "eval_interval": 20, "eval_iters": 4, "save_interval": 5, "log_interval": 1, "seed": 11, "dtype": "float32"},
}


def _config(tmp_path: Path, **train) -> Path:  # type: ignore[no-untyped-def]
    config = json.loads(json.dumps(TINY))
    config["train"].update(train)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(home: Path, threads: int = 1) -> dict[str, str]:
    return {**os.environ, "LAMINA_HOME": str(home), "LAMINA_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1"}


def _metrics(home: Path, name: str = "tiny") -> dict[int, dict]:
    path = home / "runs" / name / "metrics.jsonl"
    return {r["step"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def _lamina(home: Path, *args: str, threads: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lamina", *args], capture_output=True, text=True, env=_env(home, threads), timeout=600)


def test_lr_schedule() -> None:
    assert lr_at(0, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 0.1, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 0.1, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 0.1, 10) == pytest.approx(0.55)  # cosine midpoint
    assert lr_at(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    values = [lr_at(s, 100, 1.0, 0.1, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny run through the CLI: dataset, tokenizer, shards, training, export."""
    home = tmp_path_factory.mktemp("train-home")
    result = _lamina(home, "pretrain", "--config", str(_config(home)), threads=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return home


def test_a_run_learns_checkpoints_and_registers_a_model(trained: Path) -> None:
    metrics = _metrics(trained)
    assert sorted(metrics) == list(range(1, 41))
    assert metrics[40]["val_loss"] < metrics[20]["val_loss"] < 5.95  # ln(384) = 5.95 is where a run starts
    assert metrics[40]["loss"] < metrics[1]["loss"] - 0.5
    assert all(0 < r["mfu"] < 1.5 and r["tokens_per_s"] > 0 for r in metrics.values())
    run = trained / "runs" / "tiny"
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    latest = (run / "checkpoints" / "latest").read_text()
    assert latest == "step-000040" and (run / "checkpoints" / latest / "model.safetensors").exists()
    model = trained / "models" / "tiny"
    assert json.loads((model / "config.json").read_text())["model_type"] == "lamina"
    assert json.loads((model / "training.json").read_text())["best_val_loss"] == pytest.approx(metrics[40]["val_loss"], abs=1e-4)


def test_the_registered_model_generates_and_evaluates(trained: Path) -> None:
    listed = _lamina(trained, "models")
    assert "tiny" in listed.stdout
    generated = _lamina(trained, "generate", "--model", "tiny", "--temperature", "0", "--max-tokens", "12", "The")
    assert generated.returncode == 0 and generated.stdout.endswith("\n"), generated.stderr
    from lamina import LLM

    llm = LLM.load("tiny", device="cpu", dtype="float32", home=trained)
    completion = llm.generate("The", max_tokens=12, temperature=0, ignore_eos=True)
    assert completion.completion_tokens == 12 and completion.finish_reason == "length"
    assert llm.chat_template is None and llm.tokenizer.eos_token == "<|endoftext|>"
    evaluated = _lamina(trained, "evaluate", "--model", "tiny", "--dataset", "pydoc")
    assert evaluated.returncode == 0, evaluated.stderr
    loss = float(evaluated.stdout.split("loss ")[1].split(",")[0])
    assert abs(loss - _metrics(trained)[40]["val_loss"]) < 0.35  # all held-out tokens vs 4 sampled batches


def test_kill_9_then_resume_continues_the_same_run(tmp_path) -> None:
    config = _config(tmp_path)
    reference_home, home = tmp_path / "reference", tmp_path / "killed"
    assert _lamina(reference_home, "pretrain", "--config", str(config)).returncode == 0
    expected = _metrics(reference_home)
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "pretrain", "--config", str(config)], env=_env(home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = home / "runs" / "tiny" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step-000015":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(_metrics(home))
    assert killed_at < 40
    resumed = _lamina(home, "pretrain", "--config", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _metrics(home)
    assert sorted(got) == list(range(1, 41))  # one continuous curve, no gap, no duplicate
    for step in range(1, 41):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-5), step
    assert got[40]["val_loss"] == pytest.approx(expected[40]["val_loss"], abs=1e-5)
    checkpoints = home / "runs" / "tiny" / "checkpoints"
    assert not list(checkpoints.glob(".step-*"))  # no half-written checkpoint left behind


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, strategy: str) -> None:
    """2 ranks x micro-batch 4 against 1 process x micro-batch 4 x 2 accumulation steps: the same global batch.

    The data is the same by construction (batches are a function of seed and step); the only difference is
    the order of the gradient sums (the all-reduce adds the two ranks' halves, one process adds them in its
    accumulation), which in fp32 moves the loss by ~1e-7 per step and stays far below 1e-4 over these steps.

    DDP runs on two *nodes* where this machine can make network namespaces (root or CAP_NET_ADMIN): one rank
    in each, torchrun's c10d rendezvous on node 0's address, gloo over the veth link between them, as across
    two machines. FSDP runs as two ranks on one node.
    """
    steps = {"max_steps": 12, "save_interval": 100, "eval_interval": 12, "warmup_steps": 2}
    single = _config(tmp_path / "one", micro_batch_size=4, grad_accum=2, **steps) if (tmp_path / "one").mkdir() is None else None
    double = _config(tmp_path / "two", micro_batch_size=4, grad_accum=1, **steps) if (tmp_path / "two").mkdir() is None else None
    home = tmp_path / "home"
    one = _lamina(home, "pretrain", "--config", str(single), "--name", "one")
    assert one.returncode == 0, one.stderr[-2000:]
    tag = str(os.getpid() % 10_000)
    nodes = _netns_pair(tag) if strategy == "ddp" else None
    try:
        if nodes is None:
            two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lamina", "pretrain",
                                  "--config", str(double), "--name", "two", "--strategy", strategy],
                                 capture_output=True, text=True, env=_env(home), timeout=600)
            assert two.returncode == 0, two.stderr[-3000:]
        else:
            _two_nodes(nodes, tag, home, double)
    finally:
        for ns in (f"lam{tag}a", f"lam{tag}b") if nodes else ():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    a, b = _metrics(home, "one"), _metrics(home, "two")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-4), (step, a[step]["loss"], b[step]["loss"])
    assert b[12]["val_loss"] == pytest.approx(a[12]["val_loss"], abs=1e-4)
    assert (home / "models" / "two" / "model.safetensors").exists()  # rank 0 gathered and wrote the full weights


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model": {"family": "gpt2", "n_layers": 2, "n_heads": 3, "dim": 64}}, "dim (64) must be divisible by n_heads (3)"),
        ({"tokenizer": {"vocab_size": 100}}, "smaller than the byte alphabet"),
        ({"train": {"max_step": 5}}, "unknown TrainArgs keys ['max_step']"),
        ({"modle": {}}, "unknown RunConfig keys ['modle']"),
        ({"data": {"dataset": "nothing-here"}}, "nothing-here"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, change: dict, expected: str) -> None:
    config = json.loads(json.dumps(TINY))
    for key, value in change.items():
        config[key] = value if key not in config or key == "model" else {**config[key], **value}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _lamina(tmp_path / "home", "pretrain", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def test_empty_dataset_is_refused(tmp_path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("x")
    home = tmp_path / "home"
    built = _lamina(home, "data", "ingest", str(docs), "--dataset", "empty")
    assert built.returncode == 2 and "empty" in built.stderr and len(built.stderr.strip().splitlines()) == 1


def test_llama_moe_config_trains_and_serves(tmp_path) -> None:
    config = json.loads(json.dumps(TINY))
    config["name"] = "tiny-moe"
    config["model"] = {"family": "llama", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128,
                       "tie_embeddings": True, "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_dim": 64}}
    config["train"].update(max_steps=12, eval_interval=12, save_interval=12)
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config))
    home = tmp_path / "home"
    result = _lamina(home, "pretrain", "--config", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = _metrics(home, "tiny-moe")
    assert metrics[12]["loss"] < metrics[1]["loss"]
    from lamina import LLM

    llm = LLM.load("tiny-moe", device="cpu", dtype="float32", home=home)
    assert llm.config.moe is not None and llm.config.moe.n_experts == 4
    assert llm.generate("The", max_tokens=5, temperature=0, ignore_eos=True).completion_tokens == 5


def test_cross_validation_trains_k_models_on_document_folds(tmp_path) -> None:
    path = _config(tmp_path, max_steps=10, eval_interval=10, save_interval=10)
    home = tmp_path / "home"
    result = _lamina(home, "evaluate", "--dataset", "pydoc", "--cv", "3", "--config", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("3-fold cross-validation of tiny on pydoc (seed 7): val loss ") and "±" in line
    folds = [float(x) for x in line.split("folds: ")[1].rstrip(")").split(", ")]
    assert len(folds) == 3 and len(set(folds)) == 3 and all(4.0 < f < 7.0 for f in folds)
    metas = [json.loads((p / "meta.json").read_text()) for p in sorted((home / "shards").glob("*cv*of3"))]
    assert len(metas) == 3
    documents = metas[0]["train_documents"] + metas[0]["val_documents"]
    assert sum(m["val_documents"] for m in metas) == documents  # every document is held out exactly once


def _netns_pair(tag: str) -> tuple[list[str], list[str]] | None:
    """Two network namespaces joined by a veth pair (10.77.x.1 and 10.77.x.2): two "nodes" on this machine. None
    where the namespaces cannot be made (no CAP_NET_ADMIN, no iproute2)."""
    import shutil

    ip = shutil.which("ip")
    if ip is None:
        return None
    a, b, net = f"lam{tag}a", f"lam{tag}b", int(tag) % 250 + 1
    steps = [["netns", "add", a], ["netns", "add", b], ["link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b"],
             ["link", "set", f"v{tag}a", "netns", a], ["link", "set", f"v{tag}b", "netns", b],
             ["-n", a, "addr", "add", f"10.77.{net}.1/24", "dev", f"v{tag}a"], ["-n", b, "addr", "add", f"10.77.{net}.2/24", "dev", f"v{tag}b"],
             ["-n", a, "link", "set", f"v{tag}a", "up"], ["-n", b, "link", "set", f"v{tag}b", "up"],
             ["-n", a, "link", "set", "lo", "up"], ["-n", b, "link", "set", "lo", "up"], ["netns", "exec", b, "true"]]
    for step in steps:
        if subprocess.run([ip, *step], capture_output=True).returncode != 0:
            subprocess.run([ip, "netns", "del", a], capture_output=True)
            subprocess.run([ip, "netns", "del", b], capture_output=True)
            return None
    return [ip, "netns", "exec", a], [ip, "netns", "exec", b]


def _two_nodes(nodes: tuple[list[str], list[str]], tag: str, home: Path, config: Path) -> None:
    """`lamina pretrain` under torchrun on both nodes at once, one rank each, rendezvous on node 0."""
    net = int(tag) % 250 + 1
    procs = []
    for rank, prefix in enumerate(nodes):
        env = {**_env(home), "GLOO_SOCKET_IFNAME": f"v{tag}{'ab'[rank]}"}
        command = [*prefix, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"10.77.{net}.1:29411",
                   "--rdzv_id", f"lamina-{tag}", "--local_addr", f"10.77.{net}.{rank + 1}",
                   # node 0 holds the store: torchrun cannot tell, as the namespace's address is not the hostname's
                   "--rdzv_conf", f"is_host={'true' if rank == 0 else 'false'}",
                   "-m", "lamina", "pretrain", "--config", str(config), "--name", "two"]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outcomes = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outcomes, strict=True):
        assert p.returncode == 0, err[-3000:]
