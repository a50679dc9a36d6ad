"""Live progress: rich bars (one per rank) on a terminal, short plain lines in logs."""

from __future__ import annotations

import io

from kiln.orchestrator.progress import ProgressView


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_shows_one_bar_per_rank():
    out = _Terminal()
    view = ProgressView(2, stream=out)
    view.show({0: {"what": "piece 1 size sym", "done": 1, "total": 4}})
    view.show({0: {"what": "piece 3 size 8", "done": 3, "total": 4}, 1: {"what": "piece 0 size sym", "done": 0, "total": 4}})
    view.close()
    text = out.getvalue()
    assert "rank 0" in text and "rank 1" in text
    assert "3/4" in text and "piece 3 size 8" in text


def test_logs_get_a_line_per_change_and_nothing_on_a_repeat():
    out = io.StringIO()
    view = ProgressView(2, stream=out)
    state = {0: {"what": "piece 1 size sym", "done": 1, "total": 2}}
    view.show(state)
    view.show(state)  # nothing new: no line
    view.show({0: {"what": "piece 2 size sym", "done": 2, "total": 2}})  # finished: shown at once
    view.close()
    assert out.getvalue().splitlines() == ["rank 0: 1/2 piece 1 size sym", "rank 0: 2/2 piece 2 size sym"]
    assert "\x1b" not in out.getvalue()


def test_disabled_view_prints_nothing():
    out = _Terminal()
    view = ProgressView(1, stream=out, enabled=False)
    view.show({0: {"what": "x", "done": 1, "total": 1}})
    view.close()
    assert out.getvalue() == ""
