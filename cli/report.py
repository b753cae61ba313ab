"""Plain-text rendering of nested reports (``inspect``, ``info``)."""

from __future__ import annotations

from typing import Any

from conv3dt.report import inspect_report

__all__ = ["inspect_report", "render"]


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return str(value)


def render(report: dict[str, Any], indent: int = 0) -> str:
    """Indented ``key: value`` lines; nested dicts become sections."""
    lines = []
    pad = "  " * indent
    for key, value in report.items():
        if isinstance(value, dict):
            if not value:
                lines.append(f"{pad}{key}: none")
                continue
            lines.append(f"{pad}{key}:")
            lines.append(render(value, indent + 1))
        elif isinstance(value, list) and value and isinstance(value[0], list):
            lines.append(f"{pad}{key}:")
            lines.extend(f"{pad}  {_scalar(row)}" for row in value)
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(lines)
