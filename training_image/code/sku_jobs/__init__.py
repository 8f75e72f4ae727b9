"""Job code that runs inside the training container (augment, train, evaluate).

Never imports Airflow: the same code runs on SageMaker and under the local job backend.
"""
