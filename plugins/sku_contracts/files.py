"""File names, CSV columns and artefact formats shared by the DAG and the job code.

One definition for both sides of the job boundary (see docs/contracts.md for the meaning of
each file). Standard library only.
"""

from __future__ import annotations

# -- batches in S3 / on FSx (``incoming/<batch_id>/...``) ------------------------------------
BATCH_MANIFEST = "manifest.json"
SUCCESS_MARKER = "_SUCCESS"
IMAGES_DIR = "images"
AUGMENTED_DIR = "augmented"

# -- dataset snapshot (``datasets/<snapshot_id>/``: the training jobs' ``manifests`` channel) -
SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("path", "class_index", "sku_id", "sha256")
CLASSES_FILE = "classes.json"
EVALUATION_CONTEXT_FILE = "evaluation_context.json"


def split_file(split: str) -> str:
    """``train`` → ``train.csv``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return f"{split}.csv"


# -- augmentation job --------------------------------------------------------------------------
AUGMENT_INPUTS_FILE = "augment_inputs.csv"
AUGMENT_INPUT_COLUMNS = ("path", "sha256", "sku_id", "output_dir")
AUGMENTATION_MANIFEST_PREFIX = "augmentation_manifest-"  # + <host>.csv
AUGMENTATION_MANIFEST_COLUMNS = (
    "variant_path", "source_path", "source_sha256", "variant_index", "seed",
    "sha256", "width", "height", "params",
)
AUGMENTATION_SKIPPED_PREFIX = "skipped-"  # + <host>.csv
AUGMENTATION_SKIPPED_COLUMNS = ("source_path", "reason")
#: The training loaders decode a photo at >= image_size / 0.875 on its short side (JPEG draft,
#: sku_jobs.data.eval_resize) before any crop; variants are drawn with aspect ratios down to 3:4.
EVAL_RESIZE_RATIO = 0.875
VARIANT_MIN_ASPECT = 0.75


def variant_max_side(train_image_size: int) -> int:
    """Default longer side of an augmented variant for training at ``train_image_size`` px.

    The variant's *shorter* side (>= 3/4 of the longer) is then at least the short side the
    training loader decodes a photo at (``image_size / 0.875``), so a variant carries the detail
    training can use and no more: ~1.52x the training size (224 -> 342 px, 96 -> 147 px),
    instead of the source's full size (12 MP photos: 4000 px).
    """
    import math

    return math.ceil(int(train_image_size) / EVAL_RESIZE_RATIO / VARIANT_MIN_ASPECT)

# -- model and evaluation artefacts ---------------------------------------------------------------
MODEL_STATE_FILE = "model.pt"
MODEL_FORMAT = "sku-model/v1"
MODEL_ARCHIVE = "model.tar.gz"     # SM_MODEL_DIR, packed by SageMaker (or the local backend)
OUTPUT_ARCHIVE = "output.tar.gz"   # SM_OUTPUT_DATA_DIR, packed likewise
EVALUATION_FILE = "evaluation.json"
EVALUATION_FORMAT = "sku-evaluation/v1"
REPORT_FILE = "report.html"

# -- hyperparameters the DLC's launcher reads (sagemaker-training toolkit) ---------------------
PROGRAM_HP = "sagemaker_program"
SMDDP_ENABLED_HP = "sagemaker_distributed_dataparallel_enabled"
INSTANCE_TYPE_HP = "sagemaker_instance_type"
