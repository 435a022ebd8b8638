"""Callbot Workbench engine: conversations, LLM backends and the SQL store.

Nothing here imports Streamlit: the app, the CLI and the notebooks are thin front ends over this package.
"""

__version__ = "0.1.0"
