"""What reaches the console from Ray Data: nothing by default, its per-execution lines with --verbose."""
import pytest
import ray.data as ray_data

from ioisray.recipes.console import quiet_data_context


@pytest.fixture
def data_context():
    ctx = ray_data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    yield ctx
    ctx.enable_progress_bars, ctx.print_on_execution_start = saved


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_data_prints_its_executions_only_when_verbose(data_context, monkeypatch, verbose):
    data_context.enable_progress_bars = data_context.print_on_execution_start = True
    if verbose:
        monkeypatch.setenv("IOISRAY_VERBOSE", "1")
    else:
        monkeypatch.delenv("IOISRAY_VERBOSE", raising=False)
    quiet_data_context()
    assert data_context.print_on_execution_start is verbose
    assert data_context.enable_progress_bars is False  # ioisray prints its own progress either way
