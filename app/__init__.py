"""The Streamlit workbench: a thin UI over `callbot_core` (no SQL, no business rules here)."""
