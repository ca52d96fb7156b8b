import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module", params=["as_shipped", "structured_at_every_size"])
def planner_both_ways(request):
    """A module's tests twice: with the planner as shipped (small problems of fixed, unions and
    non-causal windows on the masked kernel, `planner.SMALL_KEYS`) and with SMALL_KEYS 0, so that
    its small shapes test the structured kernels too. Plans are cached: none made before, none
    kept after."""
    planner = importlib.import_module("engine.planner")
    caches = (planner.plan, importlib.import_module("engine.attention").backend_for)
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "structured_at_every_size":
            patch.setattr(planner, "SMALL_KEYS", 0)
        for cache in caches:
            cache.cache_clear()
        yield request.param
    for cache in caches:
        cache.cache_clear()
