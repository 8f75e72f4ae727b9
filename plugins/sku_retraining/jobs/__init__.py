"""Container jobs (augmentation, training, evaluation) as SageMaker CreateTrainingJob requests, run on SageMaker or locally."""
