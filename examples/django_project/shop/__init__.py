"""The example app: one model and two singleton tasks."""
