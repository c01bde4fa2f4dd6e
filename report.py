"""What the project writes for people to read: markdown tables, and PNG figures drawn with matplotlib's object API
(no pyplot, so a caller's backend is left alone) when matplotlib is installed."""
import sys
from pathlib import Path

from fileio import atomic_write


def table_header(headings: list[str]) -> str:
    """A markdown table's heading line and alignment line: the first column left-aligned, the others right."""
    return "| " + " | ".join(headings) + " |\n|---|" + "--:|" * (len(headings) - 1)


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(headings: list[str], rows: list[list[str]]) -> str:
    return "\n".join([table_header(headings), *map(table_row, rows)]) + "\n"


def figure(png_path: Path, shows: str, then: str, **options):
    """A new matplotlib Figure (options as Figure takes them) to draw png_path on; None when matplotlib is not
    installed, after a note on stderr saying what the picture shows and, in then, how to draw it later."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"note: matplotlib is not installed, so there is no {png_path} ({shows}); pip install matplotlib, "
              f"then {then}", file=sys.stderr)
        return None
    return Figure(**options)


def save_figure(fig, png_path: Path) -> None:
    """Write fig to png_path atomically."""
    with atomic_write(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
