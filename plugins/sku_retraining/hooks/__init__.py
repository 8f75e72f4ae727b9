"""Airflow-facing hooks of the project."""
