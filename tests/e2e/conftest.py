"""Fixtures shared by the end-to-end tests."""
import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        import ray
        import ray.data
    except ImportError as e:
        pytest.skip(f'Ray Data is not importable ({e}): pip install -e ".[ray]"')
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # recent Ray turns token auth on by default
        started = not ray.is_initialized()
        if started:  # the workers inherit this environment (and the checkpoint's tmp path)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        if started:
            ray.shutdown()
