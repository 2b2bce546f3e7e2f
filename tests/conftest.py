import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Shapes data generated once for the whole session, shared by every training test."""
    return tmp_path_factory.mktemp("shapes")
