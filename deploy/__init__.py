"""Deployment tooling (CloudFormation, image build, MWAA/Astro packaging); never shipped to Airflow."""
