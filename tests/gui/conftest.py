from __future__ import annotations

import pytest
from window_helpers import make_window


@pytest.fixture
def window(qtbot, tmp_path, data_dir):
    w = make_window(qtbot, tmp_path)
    yield w
    w.shutdown()
