import os

import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Shapes data generated once per test run, shared by every training test."""
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="session", autouse=True)
def image_check_cache(tmp_path_factory):
    """The image-check cache of every test (and the processes they start) goes to a
    temporary folder, not the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("NORMPILOT_CACHE_DIR")
    os.environ["NORMPILOT_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("NORMPILOT_CACHE_DIR", None)
    else:
        os.environ["NORMPILOT_CACHE_DIR"] = previous
