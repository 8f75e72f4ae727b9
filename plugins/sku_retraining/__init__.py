"""sku_retraining: the project package for Airflow (operators, sensors, hooks, domain logic)."""
