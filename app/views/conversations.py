"""Conversations: placeholder until the page is built."""

import streamlit as st

st.title("Conversations")
