"""Airflow-facing sensors of the project."""
