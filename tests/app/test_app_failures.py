"""No traceback reaches a user: a bug on a page is logged with an id and shown as one line; bad uploads are one line."""

from __future__ import annotations

import logging

import pytest

from callbot_core.store import Store
from tests.app.helpers import PW, sign_in, view


def test_a_bug_on_a_page_shows_an_error_id_and_logs_the_traceback(
    app_store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom at postgresql+psycopg://callbot:hunter2-secret@db/callbot")

    at = sign_in("rita", PW)
    monkeypatch.setattr("callbot_core.jobs.reports.list_runs", broken)
    with caplog.at_level(logging.ERROR, logger="callbot.app"):
        at.switch_page(view("reports")).run()
    assert not at.exception, "a traceback was shown to the user"
    (error,) = [e.value for e in at.error]
    assert error.startswith("Something went wrong on our side (error id `")
    error_id = error.split("`")[1]
    assert "boom" not in error and "RuntimeError" not in error
    # The server's log has the id, the traceback, and no password.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"error {error_id}:" in logged and "RuntimeError: boom" in logged and "broken" in logged
    assert "hunter2-secret" not in logged


def test_a_suite_upload_that_is_not_utf8_is_one_line(app_store: Store) -> None:
    at = sign_in("rita", PW)
    at.switch_page(view("personas")).run()
    at.selectbox(key="personas_key").select("receptionist").run()
    at.selectbox(key="ps_suite").select("(uploaded file)").run()
    latin1 = "name: café\ncases: []\n".encode("latin-1")
    at.file_uploader(key="ps_upload").set_value(("latin1.yaml", latin1, "text/yaml"))
    at.run()
    at.button(key="ps_run").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == ["latin1.yaml: not UTF-8 text (byte 9 is 0xe9); save it as UTF-8"]
