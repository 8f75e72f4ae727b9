# Astro project image (astro deploy / astro dev start): Astro Runtime on Airflow 3.3, the same
# Airflow as requirements.txt pins. The Runtime's ONBUILD steps install packages.txt (none
# needed: psycopg and Pillow ship binary wheels) and requirements.txt, and copy the project;
# .dockerignore keeps the dev-only parts (venvs, tests, devtools/, bench/, the local stack) out.
FROM astrocrpublic.azurecr.io/runtime:3.3-2

# The deployment's configuration (python -m deploy.render_config > include/config/deployment.json).
ENV SKU_RETRAINING_CONFIG=/usr/local/airflow/include/config/deployment.json
