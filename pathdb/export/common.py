"""Shared pieces of the exporters: the error type and safe output-path handling."""

from __future__ import annotations

from pathlib import Path


class ExportError(ValueError):
    """An export that cannot be written (unwritable path, unknown format, inexpressible circuit)."""


def output_path(
    path: str | Path, formats: dict[str, str], fmt: str | None = None
) -> tuple[Path, str]:
    """Resolve ``path`` and its format (given, or from the suffix via ``formats``: suffix -> format)."""
    p = Path(path)
    if fmt is None:
        fmt = formats.get(p.suffix.lower())
        if fmt is None:
            raise ExportError(
                f"cannot tell the format of {str(p)!r} from its suffix {p.suffix!r}; "
                f"use one of {sorted(formats)} or pass the format explicitly"
            )
    elif fmt not in set(formats.values()):
        raise ExportError(f"unknown format {fmt!r}; choose one of {sorted(set(formats.values()))}")
    if not p.parent.exists():
        raise ExportError(f"cannot write {str(p)!r}: directory {str(p.parent)!r} does not exist")
    if p.is_dir():
        raise ExportError(f"cannot write {str(p)!r}: it is a directory")
    return p, fmt


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, turning OS errors into :class:`ExportError`."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ExportError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
