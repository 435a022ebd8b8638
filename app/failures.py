"""An unexpected error on a page: logged in full on the server under a short id, shown to the user as one line
with that id. Engine errors the user can act on (`CallbotError`) are shown by `run_action` instead; this is for
bugs, which must not show a traceback (it would disclose code, paths and sometimes data) but must be findable.
"""

from __future__ import annotations

import logging
import secrets
import traceback

import streamlit as st
from streamlit.navigation.page import StreamlitPage

from callbot_core.settings import get_settings
from callbot_core.store.redaction import scrub, url_password

log = logging.getLogger("callbot.app")


def log_failure(exc: BaseException) -> str:
    """Log `exc` with its traceback (passwords masked) under a new id; the id is returned."""
    error_id = secrets.token_hex(4)
    detail = "".join(traceback.format_exception(exc))
    log.error("error %s:\n%s", error_id, scrub(detail, url_password(get_settings().database_url)))
    return error_id


def show_failure(exc: BaseException) -> str:
    error_id = log_failure(exc)
    st.error(f"Something went wrong on our side (error id `{error_id}`). It has been logged; tell an admin the id.")
    return error_id


def run_page(page: StreamlitPage) -> None:
    """Run the chosen page; an unexpected error is logged and shown as one line (st.stop/st.rerun pass through:
    they are BaseException, not Exception)."""
    try:
        page.run()
    except Exception as exc:  # noqa: BLE001 - every bug on a page ends here, by design
        show_failure(exc)
