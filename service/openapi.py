"""`python -m service.openapi`: write the service's OpenAPI document to openapi.json at the repo root.

A test regenerates it and fails when the committed file differs (CONTRACT §4).
"""

from __future__ import annotations

import json
from pathlib import Path

from .app import create_app
from .settings import Settings

PATH = Path(__file__).resolve().parent.parent / "openapi.json"


def render() -> str:
    """The document as committed: the app's schema, indented, with a final newline."""
    return json.dumps(create_app(Settings(device="cpu")).openapi(), indent=2) + "\n"


def main() -> None:
    PATH.write_text(render())
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
