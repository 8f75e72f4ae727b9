"""sku_contracts: what both sides of the job boundary agree on, in one place.

Torch- and Airflow-free (standard library only). The Airflow package (``sku_retraining``) and
the training image's job code (``training_image/code``) both import it: the image gets it
from ``plugins/sku_contracts`` at build time (``training_image/Dockerfile``, build context =
the repository root), a plugins.zip deployment ships it next to ``sku_retraining``.

- :mod:`sku_contracts.ids`: the id pattern for batch and SKU ids and file names.
- :mod:`sku_contracts.files`: file names, CSV columns and artefact formats.
- :mod:`sku_contracts.metrics`: the metric lines the jobs print and the regexes that read them.
"""
