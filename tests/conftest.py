"""Fixtures shared by the test modules, and the ``--plugin`` option of the contract suite.

``python -m pytest tests/test_contract.py --plugin my_attn.py`` (repeatable) loads the plugin files
before collection, and the contract suite then runs on the mechanisms they register.
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--plugin", action="append", default=[], metavar="FILE",
                     help="a plugin file registering mechanisms: tests/test_contract.py runs on them (repeatable)")


def pytest_configure(config):
    files = config.getoption("--plugin") or []
    if not files:
        return
    import mechanisms
    from effbench.plugins import load_plugins

    from effbench.plugins import PluginError

    before = set(mechanisms.REGISTRY)
    try:
        load_plugins(files)
    except PluginError as exc:
        raise pytest.UsageError(f"--plugin: {exc}") from None
    config.contract_mechanisms = [name for name in mechanisms.REGISTRY if name not in before]
    if not config.contract_mechanisms:
        raise pytest.UsageError(f"--plugin {', '.join(files)}: the file(s) register no mechanism")


@pytest.fixture
def one_thread():
    """Small tensors: one intra-op thread is as fast and immune to oversubscription on a busy 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
