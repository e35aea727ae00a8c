"""The terminal: brief lines, warnings above a running bar, bars that honour TQDM_DISABLE."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from ccsr.console import CONSOLE, ConsoleHandler, bar, bars_disabled, duration


@pytest.fixture
def logger():
    log = logging.getLogger("ccsr.test_console")
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log
    log.handlers.clear()
    log.propagate = True


def test_brief_terminal_shows_console_lines_and_warnings_only(logger):
    out = io.StringIO()
    logger.addHandler(ConsoleHandler(brief=True, stream=out))
    logger.info("iteration 1 · judge: 40 images scored", extra=CONSOLE)
    logger.info("encoding cache: 4/4 images to encode")  # the log file's business
    logger.warning("prompter: 3 of 4 prompts after 8 attempts")
    assert out.getvalue().splitlines() == [
        "iteration 1 · judge: 40 images scored",
        "warning: prompter: 3 of 4 prompts after 8 attempts",
    ]


def test_verbose_terminal_shows_every_record_with_time_and_logger(logger):
    out = io.StringIO()
    logger.addHandler(ConsoleHandler(brief=False, stream=out))
    logger.info("encoding cache: 4/4 images to encode")
    (line,) = out.getvalue().splitlines()
    assert line.endswith("INFO ccsr.test_console: encoding cache: 4/4 images to encode")


def test_a_record_logged_during_a_bar_gets_a_line_of_its_own(logger, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = io.StringIO()
    logger.addHandler(ConsoleHandler(brief=True, stream=out))
    with bar(total=4, desc="iteration 1 · candidates", file=out, mininterval=0) as progress:
        progress.update(2)
        logger.warning("a library complains")
        progress.update(2)
    text = out.getvalue()
    # The bar is cleared (carriage return, spaces, carriage return) before the line and drawn again after it.
    assert "\rwarning: a library complains\n" in text
    before, after = text.split("warning: a library complains\n")
    assert "2/4" in before and "4/4" in after


@pytest.mark.parametrize(
    "value, disabled",
    [("1", True), ("true", True), ("yes", True), ("", False), ("0", False), ("false", False)],
)
def test_tqdm_disable_is_read_when_a_bar_is_made(monkeypatch, value, disabled):
    monkeypatch.setenv("TQDM_DISABLE", value)
    assert bars_disabled() is disabled
    out = io.StringIO()
    # An explicit disable=False, as the trainer passes on its main process, loses to the variable.
    for _ in bar(range(3), desc="train · LoRA", file=out, disable=False, mininterval=0):
        pass
    assert ("train · LoRA" in out.getvalue()) is not disabled


def test_python_warnings_reach_the_terminal_as_log_records(tmp_path, capsys):
    from ccsr.cli import _remove_log_handlers, _setup_logging

    _setup_logging(logging.INFO, tmp_path / "ccsr.log", brief=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a deprecated argument", FutureWarning, stacklevel=1)
    finally:
        _remove_log_handlers()
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "FutureWarning: a deprecated argument" in err
    assert "FutureWarning: a deprecated argument" in (tmp_path / "ccsr.log").read_text()


def test_durations_read_naturally():
    assert duration(12.34) == "12.3 s"
    assert duration(125) == "2 min 5 s"
    assert duration(3840) == "1 h 4 min"
