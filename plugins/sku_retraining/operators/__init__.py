"""Airflow-facing operators of the project."""
