"""The data lake: named, versioned datasets of documents as Parquet files under LAMINA_HOME/datalake.

Storage only: what goes in a dataset (cleaning, dedup) is decided in `lamina.foundation.data`. Layout:

    datalake/
      NAME/
        latest                  "vN": the newest version, for tools outside Lamina (shell, duckdb CLI)
        v1/
          data-00000.parquet    rows of doc_id, text, source (+ optional string columns)
          data-00001.parquet    more parts when the text passes `part_bytes`
          manifest.json         name, version, created_at, sources, steps, counts, hashes, schema
        v2/ ...
        .v3.tmp-4242-9f2c1a0b/  a write in progress (or a crashed one) by process 4242: invisible to readers

A version is written whole into a hidden temporary folder, fsynced, then renamed to `vN`: the rename is
the commit, so a reader sees a complete version or none, and a crash leaves only a temporary folder that
readers ignore and the next write of that dataset removes. Versions are never changed after the rename;
a new build is a new version. The newest complete `vN` folder is the latest version; the `latest` file
mirrors it (rewritten atomically after each write) but is not what Lamina reads, so a crash between the
rename and the pointer update cannot hide a committed version.

`sql()` runs DuckDB over the latest version of every dataset, one view per dataset, in an in-memory
database with file access limited to those Parquet files and the configuration locked, and only read
statements allowed: the lake cannot be changed through it.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lamina.errors import InvalidRequestError, LaminaError
from lamina.infra.fs import atomic_write_text

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("doc_id", "text", "source")
MANIFEST = "manifest.json"
LATEST = "latest"
# Names become folder names and SQL view names: letters, digits, "_", "-", "." (not first, so no
# hidden folders and no ".."). A dash means the view must be quoted in SQL: "my-data".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION_DIR = re.compile(r"v([1-9][0-9]*)")
# ".vN.tmp-PID-RANDOM": the pid tells whether its writer still runs; the random part keeps two threads
# of one process apart.
_TMP_DIR = re.compile(r"\.v[0-9]+\.tmp-([0-9]+)-[0-9a-f]+")
# Row groups are what `iter_texts` streams; 1024 documents keeps a batch to a few MB for typical text.
ROW_GROUP_ROWS = 1024
# The statements `sql()` runs. DESCRIBE, SHOW, SUMMARIZE and FROM-first queries parse as SELECT.
_READ_STATEMENTS = ("SELECT", "EXPLAIN")
# Manifest keys the lake fills in itself; a caller's values for them are ignored.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SUGGESTION = re.compile(r' ?Did you mean "([^"]*)"\?')
_LAKE_KEYS = frozenset({"name", "version", "created_at", "counts", "hashes", "schema"})


class DatasetNotFoundError(LaminaError, LookupError):
    """A dataset name, or a version of it, that is not in the lake."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "dataset_not_found"


class DatasetCorruptError(LaminaError):
    """A committed version whose files no longer match its manifest (edited, truncated, or missing)."""

    status_code = 500
    error_type = "server_error"
    code = "dataset_corrupt"


@dataclass(frozen=True)
class DatasetVersion:
    """One committed version of a dataset: its folder and its manifest."""

    name: str
    version: int
    path: Path
    """The `vN` folder."""
    manifest: dict[str, Any]
    is_latest: bool = True

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def created_at(self) -> str:
        return str(self.manifest.get("created_at", ""))

    @property
    def documents(self) -> int:
        return int(self.manifest.get("counts", {}).get("documents", 0))

    @property
    def characters(self) -> int:
        return int(self.manifest.get("counts", {}).get("characters", 0))

    @property
    def files(self) -> list[Path]:
        """The Parquet parts, in order."""
        return [self.path / f for f in sorted(self.manifest.get("hashes", {}))]


class DataLake:
    """Datasets under `root` (LAMINA_HOME/datalake). Safe for concurrent readers and writers."""

    def __init__(self, root: Path, *, part_bytes: int = 256 * 1024 * 1024) -> None:
        if part_bytes < 1:
            raise InvalidRequestError(f"part_bytes must be positive (got {part_bytes})", param="part_bytes")
        self.root = Path(root)
        self.part_bytes = part_bytes
        """A new Parquet part starts once this many bytes of text are in the current one."""

    # --- names and lookup -----------------------------------------------------------------------------

    @staticmethod
    def check_name(name: str) -> str:
        """Return `name` if it can name a dataset, else raise an InvalidRequestError saying what is allowed."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(
                f"invalid dataset name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter "
                "or digit, at most 128 characters (e.g. 'pydoc-clean')",
                param="dataset",
            )
        return name

    def names(self) -> list[str]:
        """Datasets with at least one committed version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _NAME.fullmatch(p.name) and p.is_dir() and self._versions(p))

    def list(self, *, all_versions: bool = False) -> list[DatasetVersion]:
        """The latest version of each dataset, by name; with `all_versions`, every version (oldest first)."""
        out: list[DatasetVersion] = []
        for name in self.names():
            versions = self._versions(self.root / name)
            wanted = versions if all_versions else versions[-1:]
            out += [self._load(name, v, is_latest=v == versions[-1]) for v in wanted]
        return out

    def get(self, name: str, version: int | None = None) -> DatasetVersion:
        """A committed version (the latest when `version` is None); DatasetNotFoundError listing what exists."""
        versions = self._versions(self.root / name) if _NAME.fullmatch(str(name)) else []
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise DatasetNotFoundError(
                f"no dataset {name!r} in the data lake ({self.root}); datasets: {known} "
                "(create one with `lamina data ingest SRC... --dataset NAME`)",
                param="dataset",
            )
        if version is None:
            version = versions[-1]
        elif version not in versions:
            listed = ", ".join(f"v{v}" for v in versions)
            raise DatasetNotFoundError(
                f"dataset {name!r} has no version {version!r}; versions: {listed}", param="version"
            )
        return self._load(name, version, is_latest=version == versions[-1])

    def read(self, name: str, version: int | None = None) -> pa.Table:
        """The whole version as one table (for streaming, read `parquet_files` batch by batch)."""
        tables = [pq.read_table(path) for path in self.parquet_files(name, version)]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def parquet_files(self, name: str, version: int | None = None) -> list[Path]:
        return self.get(name, version).files

    def verify(self, name: str, version: int | None = None) -> DatasetVersion:
        """Recompute each part's sha256 against the manifest; DatasetCorruptError on any difference."""
        dataset = self.get(name, version)
        expected: dict[str, str] = dataset.manifest.get("hashes", {})
        problems: list[str] = []
        for filename, digest in sorted(expected.items()):
            path = dataset.path / filename
            if not path.is_file():
                problems.append(f"{filename} is missing")
            elif (actual := _sha256(path)) != digest:
                problems.append(f"{filename} has sha256 {actual[:12]}... but the manifest says {digest[:12]}...")
        extra = sorted(p.name for p in dataset.path.glob("*.parquet") if p.name not in expected)
        problems += [f"{filename} is not in the manifest" for filename in extra]
        if problems:
            raise DatasetCorruptError(
                f"dataset {dataset.label} is corrupt: {'; '.join(problems)}; rebuild it (`lamina data ingest`) "
                f"or read another version"
            )
        return dataset

    # --- writing --------------------------------------------------------------------------------------

    def write(self, name: str, table: pa.Table, manifest: dict[str, Any]) -> DatasetVersion:
        """Commit `table` as the next version of `name`.

        `manifest` carries what the caller knows (sources, steps, options); the lake adds name, version,
        created_at, counts, hashes and schema, overriding any keys of those names. The table needs string
        columns doc_id (unique), text and source with no nulls; further string columns are kept.
        """
        self.check_name(name)
        table = _conform(table)
        self._refuse_case_clash(name)
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp(folder)

        versions = self._versions(folder)
        version = (versions[-1] if versions else 0) + 1
        tmp = folder / f".v{version}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            hashes = self._write_parts(tmp, table)
            texts = table.column("text")
            full = {
                "name": name,
                "version": version,
                "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                **{k: v for k, v in manifest.items() if k not in _LAKE_KEYS},
                "counts": {
                    "documents": table.num_rows,
                    "characters": int(pc.sum(pc.utf8_length(texts)).as_py() or 0),
                    "bytes": int(pc.sum(pc.binary_length(texts)).as_py() or 0),
                    "files": len(hashes),
                    "parquet_bytes": sum((tmp / f).stat().st_size for f in hashes),
                },
                "hashes": hashes,
                "schema": [{"name": f.name, "type": str(f.type)} for f in table.schema],
            }
            version = self._commit(folder, tmp, full, version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # After the commit: the pointer names the newest version there is now (another writer may have
        # committed a newer one meanwhile).
        atomic_write_text(folder / LATEST, f"v{self._versions(folder)[-1]}\n")
        logger.info("data lake: wrote %s v%d (%d documents)", name, version, table.num_rows)
        return self.get(name, version)

    def _write_parts(self, tmp: Path, table: pa.Table) -> dict[str, str]:
        """Write the table as Parquet parts of about `part_bytes` of text each; sha256 of each part."""
        hashes: dict[str, str] = {}
        for i, part in enumerate(self._split(table)):
            path = tmp / f"data-{i:05d}.parquet"
            # No wall-clock or random content in the files: the same table gives the same bytes and hashes.
            pq.write_table(part, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)
            _fsync(path)
            hashes[path.name] = _sha256(path)
        return hashes

    def _split(self, table: pa.Table) -> list[pa.Table]:
        if table.num_rows == 0:
            return [table]
        sizes = pc.binary_length(table.column("text")).to_pylist()
        parts, start, running = [], 0, 0
        for i, size in enumerate(sizes):
            running += size
            if running >= self.part_bytes and i + 1 < len(sizes):
                parts.append(table.slice(start, i + 1 - start))
                start, running = i + 1, 0
        parts.append(table.slice(start))
        return parts

    def _commit(self, folder: Path, tmp: Path, manifest: dict[str, Any], version: int) -> int:
        """Rename `tmp` to the first free `vN` at or after `version`; the manifest says the final N."""
        for _ in range(1000):
            atomic_write_text(tmp / MANIFEST, json.dumps({**manifest, "version": version}, indent=2, ensure_ascii=False) + "\n")
            _fsync(tmp)
            final = folder / f"v{version}"
            if not final.exists():
                try:
                    os.rename(tmp, final)
                except OSError as e:
                    # Another writer took this number between the check and the rename (a committed
                    # version folder is never empty, so rename refuses to replace it).
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                else:
                    _fsync(folder)
                    return version
            version += 1
        raise LaminaError(f"could not find a free version number for {folder.name!r} in {folder}")

    def _refuse_case_clash(self, name: str) -> None:
        # SQL identifiers are case-insensitive in DuckDB, so "Docs" and "docs" could not both be views.
        clash = next((n for n in self.names() if n != name and n.casefold() == name.casefold()), None)
        if clash is not None:
            raise InvalidRequestError(
                f"dataset name {name!r} differs from the existing {clash!r} only in case; use {clash!r} or another name",
                param="dataset",
            )

    @staticmethod
    def _remove_stale_tmp(folder: Path) -> None:
        """Remove temporary folders of writers that are no longer running (crashed or killed)."""
        for path in folder.iterdir():
            match = _TMP_DIR.fullmatch(path.name)
            if match and path.is_dir() and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
                logger.warning("data lake: removing %s, left by an interrupted write", path)
                shutil.rmtree(path, ignore_errors=True)

    # --- reading internals ----------------------------------------------------------------------------

    @staticmethod
    def _versions(folder: Path) -> list[int]:
        """Committed versions, ascending: `vN` folders with a manifest (temporary folders never match)."""
        if not folder.is_dir():
            return []
        found = []
        for path in folder.iterdir():
            match = _VERSION_DIR.fullmatch(path.name)
            if match and (path / MANIFEST).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def _load(self, name: str, version: int, *, is_latest: bool) -> DatasetVersion:
        path = self.root / name / f"v{version}"
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DatasetCorruptError(f"dataset {name} v{version}: cannot read {path / MANIFEST}: {e}") from None
        return DatasetVersion(name=name, version=version, path=path, manifest=manifest, is_latest=is_latest)

    # --- SQL ------------------------------------------------------------------------------------------

    def sql(self, query: str, *, limit: int | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one read-only DuckDB statement over views of the latest versions; (column names, rows).

        Each dataset is a view named like it (quote names that are not SQL identifiers: "my-data").
        `limit` caps the rows fetched. Errors (syntax, unknown table or column, a statement that would
        write) are one-line InvalidRequestErrors that list the views.
        """
        import duckdb

        datasets = self.list()
        views = ", ".join(d.name if _IDENTIFIER.fullmatch(d.name) else _quote_identifier(d.name) for d in datasets)
        if not datasets:
            views = "none (no datasets yet)"
        elif any(not _IDENTIFIER.fullmatch(d.name) for d in datasets):
            views += ' (names with "-" or "." need the double quotes)'
        con = duckdb.connect(":memory:")
        try:
            for d in datasets:
                files = ", ".join(_quote_string(str(f.resolve())) for f in d.files)
                con.execute(f"CREATE VIEW {_quote_identifier(d.name)} AS SELECT * FROM read_parquet([{files}])")
            # From here on, only the views' files can be read, nothing can be written, and a query cannot
            # change these settings back.
            allowed = ", ".join(_quote_string(str(f.resolve())) for d in datasets for f in d.files)
            con.execute(f"SET allowed_paths = [{allowed}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            try:
                statements = con.extract_statements(query)
                if len(statements) != 1:
                    raise InvalidRequestError(
                        f"run one SQL statement at a time (got {len(statements)}); dataset views: {views}", param="query"
                    )
                kind = statements[0].type.name
                if kind not in _READ_STATEMENTS:
                    raise InvalidRequestError(
                        f"only queries run here (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN), not {kind}: the "
                        f"lake changes only through `lamina data ingest`; dataset views: {views}",
                        param="query",
                    )
                cursor = con.execute(query)
                columns = [c[0] for c in cursor.description or []]
                rows = cursor.fetchall() if limit is None else cursor.fetchmany(limit)
            except duckdb.Error as e:
                message = _one_line(str(e))
                if message.startswith("Catalog Error"):
                    # DuckDB suggests its own catalog tables (pg_enum, ...) for a misspelt name; the list of
                    # views that follows is the better suggestion.
                    names = {d.name for d in datasets}
                    message = _SUGGESTION.sub(lambda m: m.group(0) if m.group(1) in names else "", message)
                raise InvalidRequestError(f"SQL error: {message}; dataset views: {views}", param="query") from None
        finally:
            con.close()
        return columns, rows


def _conform(table: pa.Table) -> pa.Table:
    """Required columns first, all as `string`, no nulls in them, unique doc ids; no schema metadata."""
    if not isinstance(table, pa.Table):
        raise InvalidRequestError(f"a dataset is written from a pyarrow.Table, not {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InvalidRequestError(
            f"the table lacks the column(s) {missing}; a dataset needs {list(REQUIRED_COLUMNS)} (found {table.column_names})"
        )
    if len(set(table.column_names)) != len(table.column_names):
        raise InvalidRequestError(f"the table has repeated column names: {table.column_names}")
    columns = [*REQUIRED_COLUMNS, *(c for c in table.column_names if c not in REQUIRED_COLUMNS)]
    arrays = []
    for column in columns:
        array = table.column(column)
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            raise InvalidRequestError(f"column {column!r} is {array.type}; dataset columns must be strings")
        if column in REQUIRED_COLUMNS and array.null_count:
            raise InvalidRequestError(f"column {column!r} has {array.null_count} null value(s); give every document one")
        arrays.append(array.cast(pa.string()))
    out = pa.Table.from_arrays(arrays, names=columns)
    if out.num_rows and pc.count_distinct(out.column("doc_id")).as_py() != out.num_rows:
        counts = pc.value_counts(out.column("doc_id")).to_pylist()
        repeated = next(c["values"] for c in counts if c["counts"] > 1)
        raise InvalidRequestError(f"doc_id {repeated!r} appears more than once; doc ids must be unique within a dataset")
    return out


def _one_line(message: str) -> str:
    """DuckDB's message without the LINE/caret excerpt, on one line."""
    kept = []
    for line in message.splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            kept.append(line.strip())
    return " ".join(kept) or message.strip()


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk, so a rename after it never publishes missing data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


__all__ = ["DataLake", "DatasetCorruptError", "DatasetNotFoundError", "DatasetVersion"]
