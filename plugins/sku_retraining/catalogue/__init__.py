"""The catalogue database (PostgreSQL; RDS in production): schema, registration, split, export.

Functions here take a DB-API connection (psycopg 3, as the postgres provider hands out) so
they run the same under Airflow's ``PostgresHook``, in tests and in the benchmarks.
"""
