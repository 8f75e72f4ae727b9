"""
### SKU retraining — monthly retraining of the self-checkout product-recognition model

One run = one retraining. Scheduled at 03:00 UTC on the 1st of every month
(`0 3 1 * *`); trigger it by hand with the form's params.

1. **migrate_catalogue** — apply the catalogue DB's versioned migrations (idempotent).
2. **wait_for_new_batches** — waits (reschedule mode, 12 h) for a complete batch
   (`incoming/<batch_id>/_SUCCESS`) the catalogue has not registered; invalid manifests are
   marked rejected with the reason. Nothing new by the timeout → the run is *skipped*.
   `batch_ids` skips the waiting; `force_retrain` continues even when nothing is new.
3. **register_batches** — registers SKUs (stable class indices) and images (content-hashed),
   quarantines bad files with a reason, assigns train/val/test (deterministic, stable,
   stratified per SKU). One transaction per batch.
4. **continue_unless_dry_run** — a `dry_run` stops here (registration was rolled back).
5. **import_batches_to_fsx** — makes the new images visible on FSx for Lustre.
6. **export_augmentation_inputs** → **augment_on_fsx** → **register_variants** — every train
   original gets `variants_per_image` augmented variants written next to its batch on FSx
   (a container job: SageMaker, or the local backend), registered with their source
   (variants inherit its split: val/test hold originals only).
7. **export_manifests** — train/val/test manifests + `classes.json` to S3 and FSx, recorded
   as the run's dataset snapshot.
8. **train_model** — the SMDDP ResNet152 job (`SageMakerTrainingOperator` subclass): FSx
   channel, VPC, checkpoints (spot-safe), warm start from the production model with the head
   widened for new SKUs. A retried task re-attaches to its job; killing it stops the job.
9. **evaluate_model** → **collect_evaluation** — challenger and champion scored on the same
   test split; `evaluation.json` and an HTML report (its S3 URI is in the task log).
10. **decide** (branch) — the gates (`min_top1`, `min_new_sku_top1`,
    `max_old_sku_regression`; `force_promote` overrides) in one table in the log →
    **promote_model** (versioned, verified, then `production.json` rewritten; emits the
    production-model Asset) or **reject_model** (reasons recorded) → **finish**.

Configuration (bucket, FSx, job backend, ...) is read at run time from the packaged
defaults, the deployment file `$SKU_RETRAINING_CONFIG` and the Variable
`sku_retraining_config` (which may not set the bucket or model name); see the project README.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

try:
    from airflow.sdk import TriggerRule
except ImportError:  # Airflow 3.0.x (MWAA's newest): airflow.sdk does not export it yet
    from airflow.utils.trigger_rule import TriggerRule

from sku_retraining.assets import production_model_asset
from sku_retraining.notifications import SkuNotifier
from sku_retraining.operators.augmentation import FsxAugmentationOperator
from sku_retraining.operators.evaluation import SkuEvaluationOperator
from sku_retraining.operators.training import SkuTrainingOperator
from sku_retraining.sensors.new_batches import NewSkuBatchSensor

SCHEDULE = "0 3 1 * *"  # 03:00 UTC on the 1st of each month: batches land during the month.

# Trigger-form sections (Param(section=...)), in the order the form shows them.
SECTION_DATA = "What to train on"
SECTION_TRAINING = "Training"
SECTION_GATES = "Promotion gates"
SECTION_ADVANCED = "Advanced / AWS"


@dag(
    dag_id="sku_retraining",
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["sku-retraining", "ml", "sagemaker"],
    render_template_as_native_obj=True,
    # Channels (SNS, e-mail) and events come from the configuration when a notification fires.
    on_failure_callback=SkuNotifier(event="run_failed"),
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
    },
    # The trigger form: four sections, each ordered by how often people change the field.
    # Every field says what it does in one line; a value the form rejects names the field
    # ("Invalid input for param <name>: ...") and its rule, and the description says the rule in words.
    params={
        # -- What to train on -------------------------------------------------------------
        "batch_ids": Param(
            None,
            type=["null", "array"],
            items={"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
            title="Batch ids",
            description_md=(
                "Register exactly these batches (one id per line, e.g. `2026-11-a`) instead of waiting "
                "for new ones. Ids are the folder names under `incoming/` in the data bucket: letters, "
                "digits, `.`, `_`, `-`, up to 64 characters, starting with a letter or digit. "
                "Empty: wait for complete batches the catalogue has not registered yet."
            ),
            section=SECTION_DATA,
        ),
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Check and report what registration would do (quarantine, new SKUs, split); write nothing, stop there.",
            section=SECTION_DATA,
        ),
        "force_retrain": Param(
            False,
            type="boolean",
            title="Force retrain",
            description="Retrain on the catalogue as it is even when no new batch arrived.",
            section=SECTION_DATA,
        ),
        "variants_per_image": Param(
            4, type="integer", minimum=0, maximum=32, title="Augmented variants per train image",
            description="Augmented copies (crop, rotate, flip, colour) written next to each train original; 0 = none.",
            section=SECTION_DATA,
        ),
        # -- Training ---------------------------------------------------------------------
        "epochs": Param(
            None, type=["null", "integer"], minimum=1, maximum=200,
            title="Epochs", description="Passes over the train split, 1-200; empty = the configured default.",
            section=SECTION_TRAINING,
        ),
        "warm_start": Param(
            True, type="boolean", title="Warm start from the production model",
            description="Start from production's weights, head widened for the new SKUs (a fraction of a full retrain's cost).",
            section=SECTION_TRAINING,
        ),
        "replay_fraction": Param(
            1.0, type="number", minimum=0, maximum=1,
            title="Replay fraction", description="With warm start: share of old SKUs' train images to train on, 0-1.",
            section=SECTION_TRAINING,
        ),
        "freeze": Param(
            "auto", type="string", pattern=r"^(auto|none|[a-z0-9]+(,[a-z0-9]+)*)$",
            title="Frozen backbone layers",
            description="auto: conv1..layer3 when ImageNet weights or the warm-start model are loaded, "
                        "nothing at random init; none; or a comma list (e.g. conv1,bn1,layer1).",
            section=SECTION_TRAINING,
        ),
        "learning_rate": Param(
            0.1, type="number", exclusiveMinimum=0, maximum=10,
            title="Base learning rate", description="For a global batch of 256, scaled with the real global batch; > 0, at most 10.",
            section=SECTION_TRAINING,
        ),
        "per_gpu_batch_size": Param(
            64, type="integer", minimum=1, maximum=1024, title="Images per GPU and step",
            description="Per-GPU batch; global batch = instances x GPUs x this (1-1024).",
            section=SECTION_TRAINING,
        ),
        # -- Promotion gates --------------------------------------------------------------
        "min_top1": Param(
            0.80, type="number", minimum=0, maximum=1, title="Gate: minimum overall top-1",
            description="Promote only if the challenger's test top-1 over all SKUs is at least this (0-1).",
            section=SECTION_GATES,
        ),
        "min_new_sku_top1": Param(
            0.70, type="number", minimum=0, maximum=1, title="Gate: minimum new-SKU top-1",
            description="Promote only if top-1 on this run's new SKUs is at least this (0-1).",
            section=SECTION_GATES,
        ),
        "max_old_sku_regression": Param(
            0.01, type="number", minimum=0, maximum=1,
            title="Gate: maximum old-SKU top-1 regression vs the champion",
            description="Reject if old SKUs' top-1 drops by more than this vs production (0.01 = one point).",
            section=SECTION_GATES,
        ),
        "force_promote": Param(
            False, type="boolean", title="Promote even if a gate fails (recorded)",
            description="Override failed gates; the override and the failed gates are recorded with the version.",
            section=SECTION_GATES,
        ),
        # -- Advanced / AWS ---------------------------------------------------------------
        "train_instance_count": Param(
            2, type="integer", minimum=1, maximum=16, title="Training instances",
            description="SageMaker training instances, 1-16 (data parallel with SMDDP); local backend: ignored.",
            section=SECTION_ADVANCED,
        ),
        "train_instance_type": Param(
            "ml.p4d.24xlarge", type="string", enum=["ml.p4d.24xlarge", "ml.p4de.24xlarge"],
            title="Training instance type (SMDDP)", description="An SMDDP-capable instance type (8 x A100 each).",
            section=SECTION_ADVANCED,
        ),
        "use_spot": Param(
            False, type="boolean", title="Managed spot training",
            description="Cheaper, may wait for capacity; checkpoints make an interrupted job resume.",
            section=SECTION_ADVANCED,
        ),
        "max_wait_hours": Param(
            48, type="number", minimum=1, maximum=672, title="Spot: max wait (hours)",
            description="With spot: the job's whole budget (waiting + training), 1-672 hours.",
            section=SECTION_ADVANCED,
        ),
        "augmentation_instance_type": Param(
            "ml.c5.18xlarge", type="string", pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$",
            title="Augmentation instance type (sagemaker backend)",
            description="A SageMaker instance type such as ml.c5.18xlarge (format ml.<family>.<size>).",
            section=SECTION_ADVANCED,
        ),
        "augmentation_instance_count": Param(
            1, type="integer", minimum=1, maximum=20, title="Augmentation instances (sagemaker backend)",
            description="Instances sharing the augmentation work, 1-20.",
            section=SECTION_ADVANCED,
        ),
        "enable_network_isolation": Param(
            None, type=["null", "boolean"], title="EnableNetworkIsolation",
            description="SageMaker network isolation for the training job; empty = the configured default.",
            section=SECTION_ADVANCED,
        ),
    },
)
def sku_retraining():
    @task
    def migrate_catalogue() -> list[str]:
        from sku_retraining.tasks.intake import migrate_catalogue

        return migrate_catalogue()

    wait_for_new_batches = NewSkuBatchSensor(
        task_id="wait_for_new_batches",
        batch_ids="{{ params.batch_ids }}",
        force_retrain="{{ params.force_retrain }}",
        mode="reschedule",
        poke_interval=timedelta(minutes=10),
        timeout=timedelta(hours=12),
        soft_fail=True,
    )

    @task
    def register_batches(batch_ids: list[str]) -> list[dict]:
        from sku_retraining.tasks.intake import register_batches

        context = get_current_context()
        return register_batches(batch_ids, run_id=context["run_id"], dry_run=context["params"]["dry_run"])

    @task.short_circuit
    def continue_unless_dry_run(results: list[dict]) -> bool:
        params = get_current_context()["params"]
        if params["dry_run"]:
            return False
        return params["force_retrain"] or any(r["status"] == "registered" for r in results)

    @task
    def import_batches_to_fsx(batch_ids: list[str]) -> int:
        from sku_retraining.tasks.intake import import_batches_to_fsx

        return import_batches_to_fsx(batch_ids)

    @task
    def export_augmentation_inputs() -> dict:
        from sku_retraining.tasks.augmentation import export_augmentation_inputs

        return export_augmentation_inputs(variants_per_image=get_current_context()["params"]["variants_per_image"])

    @task
    def register_variants(job_result: dict) -> dict:
        from sku_retraining.tasks.augmentation import register_augmentation_output

        return register_augmentation_output(job_result)

    @task
    def export_manifests(batch_ids: list[str]) -> dict:
        from sku_retraining.tasks.intake import export_manifests

        return export_manifests(run_id=get_current_context()["run_id"], batch_ids=batch_ids)

    @task
    def read_production_pointer() -> dict:
        from sku_retraining.tasks.decision import read_production_pointer

        return read_production_pointer()

    @task
    def collect_evaluation(job_result: dict) -> dict:
        from sku_retraining.tasks.evaluation import collect_evaluation

        return collect_evaluation(job_result)

    @task.branch
    def decide(evaluation: dict) -> str:
        from sku_retraining.tasks.decision import decide_promotion

        context = get_current_context()
        decision = decide_promotion(evaluation, params=context["params"])
        context["ti"].xcom_push(key="decision", value=decision)
        return "promote_model" if decision["promote"] else "reject_model"

    @task(outlets=[production_model_asset()])
    def promote_model(snapshot: dict, training: dict, evaluation: dict) -> dict:
        from sku_retraining.tasks.decision import promote_challenger

        context = get_current_context()
        decision = context["ti"].xcom_pull(task_ids="decide", key="decision")
        return promote_challenger(
            run_id=context["run_id"], snapshot=snapshot, training=training, evaluation=evaluation,
            decision=decision, context=context,
        )

    @task
    def reject_model(evaluation: dict) -> dict:
        from sku_retraining.tasks.decision import reject_challenger

        context = get_current_context()
        decision = context["ti"].xcom_pull(task_ids="decide", key="decision")
        return reject_challenger(run_id=context["run_id"], evaluation=evaluation, decision=decision,
                                 context=context)

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def finish(evaluation: dict) -> dict:
        from sku_retraining.tasks.decision import summarise_run

        context = get_current_context()
        decision = context["ti"].xcom_pull(task_ids="decide", key="decision")
        return summarise_run(run_id=context["run_id"], evaluation=evaluation, decision=decision)

    # The tasks that cost money (SageMaker jobs) tell someone when they fail for good.
    paid_task_failed = SkuNotifier(event="task_failed")
    migrated = migrate_catalogue()
    registered = register_batches(wait_for_new_batches.output)
    proceed = continue_unless_dry_run(registered)
    imported = import_batches_to_fsx(wait_for_new_batches.output)
    augment_inputs = export_augmentation_inputs()
    augment = FsxAugmentationOperator(
        task_id="augment_on_fsx",
        augment_inputs=augment_inputs,
        instance_type="{{ params.augmentation_instance_type }}",
        instance_count="{{ params.augmentation_instance_count }}",
        on_failure_callback=paid_task_failed,
    )
    variants = register_variants(augment.output)
    manifests = export_manifests(wait_for_new_batches.output)

    production = read_production_pointer()
    train = SkuTrainingOperator(
        task_id="train_model",
        snapshot=manifests,
        production=production,
        instance_type="{{ params.train_instance_type }}",
        instance_count="{{ params.train_instance_count }}",
        epochs="{{ params.epochs }}",
        batch_size="{{ params.per_gpu_batch_size }}",
        learning_rate="{{ params.learning_rate }}",
        warm_start="{{ params.warm_start }}",
        replay_fraction="{{ params.replay_fraction }}",
        use_spot="{{ params.use_spot }}",
        max_wait_hours="{{ params.max_wait_hours }}",
        network_isolation="{{ params.enable_network_isolation }}",
        on_failure_callback=paid_task_failed,
    )
    evaluate = SkuEvaluationOperator(
        task_id="evaluate_model", training=train.output, snapshot=manifests, production=production,
        on_failure_callback=paid_task_failed,
    )
    evaluation = collect_evaluation(evaluate.output)
    branch = decide(evaluation)
    promoted = promote_model(manifests, train.output, evaluation)
    rejected = reject_model(evaluation)
    done = finish(evaluation)

    migrated >> wait_for_new_batches
    proceed >> imported >> augment_inputs
    variants >> manifests
    manifests >> production
    branch >> [promoted, rejected] >> done


sku_retraining()
