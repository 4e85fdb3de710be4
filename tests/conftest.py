import pytest

from ckconv import plugins


@pytest.fixture(autouse=True)
def fresh_plugin_host():
    """Every test starts with plugins loaded from the current environment (CKCONV_LOAD_PLUGINS etc.)."""
    plugins.reset()
    yield
    plugins.reset()
