"""`python -m service.openapi`: write the service's OpenAPI document to openapi.json at the repo root.

A test regenerates it and fails when the committed file differs (CONTRACT §4).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .app import create_app
from .settings import Settings

PATH = Path(__file__).resolve().parent.parent / "openapi.json"


def render() -> str:
    """The document as committed: the app's schema, indented, with a final newline."""
    return json.dumps(create_app(Settings(device="cpu")).openapi(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.openapi", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PATH, help="where to write it (default: %(default)s)")
    out = parser.parse_args(argv).out
    out.write_text(render())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
