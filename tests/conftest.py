import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from planner_support import structured_at_every_size  # noqa: E402


@pytest.fixture(scope="module", params=["as_shipped", "structured_at_every_size"])
def planner_both_ways(request):
    """A module's tests twice: with the planner as shipped (small problems of fixed, unions and
    windows on the masked kernel, `planner.SMALL_KEYS`) and with that rule off, so that
    its small shapes test the structured kernels too."""
    with structured_at_every_size() if request.param == "structured_at_every_size" else nullcontext():
        yield request.param
