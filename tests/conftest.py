import pytest
import torch


@pytest.fixture
def one_torch_thread():
    # On 2 cores shared with other work, oversubscribed OpenMP threads make small convs ~20x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
