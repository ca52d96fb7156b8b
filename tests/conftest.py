import os
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (set before the engine
# defines them): the CUDA emulation then runs them as a GPU would, one program at a time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from cuda_emulation import cuda_kernels_on_cpu  # noqa: E402
from planner_support import structured_at_every_size  # noqa: E402


@pytest.fixture(scope="module", params=["as_shipped", "structured_at_every_size", "cuda_kernels_on_cpu"])
def engine_passes(request):
    """A module's tests three times: with the planner as shipped (small problems on the masked
    kernel, `planner.SMALL_KEYS`); with that rule off, so that its small
    shapes test the structured kernels too; and so again on CUDA's branches and kernels, emulated
    on the CPU (`cuda_emulation`)."""
    with ExitStack() as stack:
        if request.param != "as_shipped":
            stack.enter_context(structured_at_every_size())
        if request.param == "cuda_kernels_on_cpu":
            stack.enter_context(cuda_kernels_on_cpu())
        yield request.param
