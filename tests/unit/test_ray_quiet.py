"""init_ray keeps Ray quiet by default and loud on request, and Ray Data's context is
made without the DeprecationWarnings Ray's own constructor raises. No cluster is started:
ray.init is replaced by a recorder."""
import logging
import warnings

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from nanovllm.integrations.ray import init_ray, quiet_data_context  # noqa: E402


def test_data_context_is_made_without_deprecation_warnings(monkeypatch):
    monkeypatch.setattr(ray.data.context, "_default_context", None)  # as in a fresh process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        context = quiet_data_context(ray)
    assert isinstance(context, ray.data.DataContext)
    assert ray.data.DataContext.get_current() is context
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []


@pytest.mark.parametrize("verbose", [False, True])
def test_init_ray_is_quiet_unless_verbose(monkeypatch, verbose):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    data_logger = logging.getLogger("ray.data")
    monkeypatch.setattr(data_logger, "level", logging.INFO)  # restored after the test
    assert init_ray("auto", verbose=verbose, num_cpus=2) is ray
    (kwargs,) = calls
    assert kwargs["address"] == "auto" and kwargs["num_cpus"] == 2
    if verbose:
        assert "log_to_driver" not in kwargs and "logging_level" not in kwargs
        assert data_logger.level == logging.INFO
    else:
        assert kwargs["log_to_driver"] is False and kwargs["logging_level"] == logging.ERROR
        assert data_logger.level == logging.WARNING


def test_init_ray_leaves_a_running_ray_alone(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init called on a running Ray"))
    assert init_ray() is ray
