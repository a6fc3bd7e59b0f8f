"""Reading record files: JSON Lines, JSON and Parquet, local or remote.

Local files are read here, record by record, so that an error names the file and the line
(``prefs.jsonl:17``), the record (``prefs.json[17]``) or the row (``prefs.parquet row 17``). Remote
URIs (``s3://``, ``gs://``, ``file://``, ...) are read with **Ray Data** (``read_json(lines=True)``,
``read_parquet``) on the cluster the caller has joined, and their rows are named ``<uri> row N``.
Rows and records count from 0, lines from 1. A Parquet or Ray Data row has every column of the file;
a column that is null in a row is left out of that row's record, as a JSON line would not have it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


class DataError(ValueError):
    """Malformed input; the message names the file, the line (record, row) and the reason."""


JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUFFIXES = JSONL_SUFFIXES + (".json", ".parquet")


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def _kind(path: str) -> str:
    name = path.lower().rstrip("/")
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DataError(f"{path}: unknown file type; expected one of {', '.join(SUFFIXES)}")


def _json_error(where: str, e: json.JSONDecodeError) -> DataError:
    return DataError(f"{where}: invalid JSON: {e.msg} (at character {e.pos + 1})")


def _jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at character "
                                f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise _json_error(where, e) from None


def _json(path: Path) -> Iterator[tuple[str, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    if not text.lstrip().startswith("["):  # JSON Lines under a .json name, as `datasets` reads it too
        yield from _jsonl(path)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e.msg} (line {e.lineno}, character {e.colno})") from None
    for i, obj in enumerate(data):
        yield f"{path}[{i}]", obj


def _parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield f"{path} row {row}", _present(obj)
            row += 1


def _present(row: dict) -> dict:
    """A table row without its null columns (the union of the records' fields)."""
    return {k: v for k, v in row.items() if v is not None}


def iter_local(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, record) of every record of a local JSONL, JSON or Parquet file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    kind = _kind(str(path))
    if kind in JSONL_SUFFIXES:
        return _jsonl(path)
    return _json(path) if kind == ".json" else _parquet(path)


def iter_remote(uri: str) -> Iterator[tuple[str, object]]:
    """(where, record) of every row of a remote JSONL or Parquet file (or directory), read with Ray
    Data on the Ray cluster this process has joined."""
    import ray.data

    kind = _kind(uri)
    try:
        ds = ray.data.read_parquet(uri) if kind == ".parquet" else ray.data.read_json(uri, lines=True)
        rows = ds.take_all()
    except Exception as e:
        raise DataError(f"{uri}: cannot read it with Ray Data ({type(e).__name__}: {e})") from None
    return ((f"{uri} row {i}", _present(row)) for i, row in enumerate(rows))


def iter_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, record) of a local file (read here) or a remote URI (Ray Data)."""
    return iter_remote(str(path)) if is_remote(path) else iter_local(path)


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path
