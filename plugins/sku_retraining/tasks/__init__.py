"""Airflow-facing tasks of the project."""
