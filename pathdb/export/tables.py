"""Paths / edges / nodes tables as Parquet, CSV or JSON files (pandas + pyarrow)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pathdb.export.common import ExportError, output_path

TABLE_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
}


def write_table(df: pd.DataFrame, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``df`` as Parquet, CSV, JSON (records array) or JSON lines; format from the suffix unless given."""
    p, f = output_path(path, TABLE_FORMATS, fmt)
    try:
        if f == "parquet":
            df.to_parquet(p, index=False)
        elif f == "csv":
            df.to_csv(p, index=False)
        elif f == "json":
            df.to_json(p, orient="records", indent=1)
        else:
            df.to_json(p, orient="records", lines=True)
    except OSError as e:
        raise ExportError(f"cannot write {str(p)!r}: {e.strerror or e}") from None
    return p


def read_table(path: str | Path, fmt: str | None = None) -> pd.DataFrame:
    """Read a table written by :func:`write_table` back."""
    p = Path(path)
    f = fmt or TABLE_FORMATS.get(p.suffix.lower())
    if f == "parquet":
        return pd.read_parquet(p)
    if f == "csv":
        return pd.read_csv(p)
    if f == "json":
        return pd.read_json(p, orient="records")
    if f == "jsonl":
        return pd.read_json(p, orient="records", lines=True)
    raise ExportError(f"unknown table format for {str(p)!r}; use one of {sorted(TABLE_FORMATS)}")
