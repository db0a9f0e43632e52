"""Fixtures shared by the end-to-end tests."""
import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole run: starting one costs ~10 s (test_ray and test_batch_cli share it)."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        pytest.skip(f'Ray Data is not importable ({e}): pip install -e ".[ray]"')
    from nanovllm.integrations.ray import init_ray
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # recent Ray turns token auth on by default
        started = not ray.is_initialized()
        # a Ray we start: the workers inherit this environment (and the checkpoint's tmp path)
        init_ray(num_cpus=2, include_dashboard=False)
        yield ray
        if started:
            ray.shutdown()
