import tunesmith


def test_version():
    assert tunesmith.__version__
