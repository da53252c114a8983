"""From a run config to a trained model: dataset -> tokenizer -> token shards -> Trainer -> registered model.

Every intermediate is cached under LAMINA_HOME by what it was made from, so a second run (or a resumed
one, or each of the k folds of cross-validation) reuses it:
- the dataset comes from the data lake; `pydoc` is built there from Python's docs on first use;
- tokenizers live in `tokenizers/<dataset>-v<version>-<content hash>-bpe<vocab>/`;
- shards live in `shards/<dataset>-v<version>-<content hash>-<tokenizer hash>-<split>/`.
Under torchrun, rank 0 prepares and the other ranks wait, then all read the same files.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lamina.foundation.data import CleaningOptions, build_dataset, iter_texts
from lamina.foundation.shards import Shards, build_shards, load_shards
from lamina.foundation.tokenizer import Tokenizer
from lamina.foundation.tokenizer_train import save_tokenizer, train_bpe
from lamina.foundation.train import StepStats, Trainer, TrainResult
from lamina.foundation.train_config import RunConfig
from lamina.infra.datalake import DataLake, DatasetNotFoundError, DatasetVersion
from lamina.infra.distributed import Distributed

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    dataset: DatasetVersion
    tokenizer: Tokenizer
    tokenizer_dir: Path
    shards: Shards


def dataset_for(lake: DataLake, name: str, version: int | None) -> DatasetVersion:
    """The dataset version to train on; `pydoc` is built from Python's bundled docs when absent."""
    try:
        return lake.get(name, version)
    except DatasetNotFoundError:
        if name != "pydoc" or version is not None:
            raise
        logger.info("building the pydoc dataset from pydoc_data.topics")
        built, _ = build_dataset(lake, "pydoc", ["pydoc"], CleaningOptions())
        return built


def content_key(dataset: DatasetVersion) -> str:
    hashes = "".join(sorted(dataset.manifest.get("hashes", {}).values()))
    return f"{dataset.name}-v{dataset.version}-{hashlib.sha256(hashes.encode()).hexdigest()[:8]}"


def tokenizer_for(config: RunConfig, dataset: DatasetVersion, lake: DataLake, home: Path) -> tuple[Tokenizer, Path]:
    if config.tokenizer.path:
        folder = Path(config.tokenizer.path).expanduser()
        return Tokenizer.from_file(folder / "tokenizer.json", {"eos_token": "<|endoftext|>"}), folder
    folder = home / "tokenizers" / f"{content_key(dataset)}-bpe{config.tokenizer.vocab_size}"
    if not (folder / "tokenizer.json").exists():
        texts = (text for _, text in iter_texts(lake, dataset.name, dataset.version))
        save_tokenizer(train_bpe(texts, config.tokenizer.vocab_size), folder)
    return Tokenizer.from_file(folder / "tokenizer.json", {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), folder


def shards_for(config: RunConfig, dataset: DatasetVersion, lake: DataLake, tokenizer: Tokenizer, tokenizer_dir: Path,
               home: Path, *, n_folds: int = 0, fold: int = -1) -> Shards:
    tok_hash = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()[:8]
    split = f"cv{fold}of{n_folds}" if n_folds else f"val{config.data.val_fraction:g}"
    folder = home / "shards" / f"{content_key(dataset)}-{tok_hash}-s{config.data.seed}-{split}"
    if (folder / "meta.json").exists():
        return load_shards(folder)
    return build_shards(iter_texts(lake, dataset.name, dataset.version), tokenizer, folder, seed=config.data.seed,
                        val_fraction=config.data.val_fraction, n_folds=n_folds, fold=fold,
                        source={"dataset": dataset.name, "version": dataset.version, "tokenizer": str(tokenizer_dir)})


def prepare(config: RunConfig, home: Path, dist: Distributed, *, n_folds: int = 0, fold: int = -1) -> Prepared:
    lake = DataLake(home / "datalake")
    if dist.is_main:
        dataset = dataset_for(lake, config.data.dataset, config.data.version)
        tokenizer, tok_dir = tokenizer_for(config, dataset, lake, home)
        shards_for(config, dataset, lake, tokenizer, tok_dir, home, n_folds=n_folds, fold=fold)
    dist.barrier()
    dataset = lake.get(config.data.dataset, config.data.version)
    tokenizer, tok_dir = tokenizer_for(config, dataset, lake, home)
    shards = shards_for(config, dataset, lake, tokenizer, tok_dir, home, n_folds=n_folds, fold=fold)
    return Prepared(dataset, tokenizer, tok_dir, shards)


def pretrain(
    config: RunConfig,
    home: Path,
    *,
    dist: Distributed | None = None,
    resume: bool = False,
    register: bool = True,
    run_dir: Path | None = None,
    on_step: Callable[[StepStats], None] | None = None,
    n_folds: int = 0,
    fold: int = -1,
) -> TrainResult:
    dist = dist or Distributed()
    prepared = prepare(config, home, dist, n_folds=n_folds, fold=fold)
    run_dir = run_dir or home / "runs" / config.name
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml())
    trainer = Trainer(config, prepared.shards, prepared.tokenizer, run_dir, dist=dist,
                      models_dir=home / "models" if register else None, cache_dir=home / "cache", on_step=on_step)
    return trainer.run(resume=resume)
