"""After the evaluation job: publish its report, hand the headline numbers to the branch."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from sku_retraining.config import PipelineConfig, load_config_from_airflow
from sku_retraining.gates import EvaluationError

log = logging.getLogger(__name__)

from sku_contracts.files import EVALUATION_FILE, REPORT_FILE  # noqa: E402

# Kept out of the XCom (12,000 SKUs make them megabytes); they stay in evaluation.json.
_BULKY_KEYS = ("per_sku", "worst_skus", "confused_pairs")


def headline(evaluation: dict) -> dict:
    """evaluation.json without the per-SKU tables: what the gates and the summary need."""
    compact = {k: v for k, v in evaluation.items() if k not in ("challenger", "champion")}
    for side in ("challenger", "champion"):
        model = evaluation.get(side)
        compact[side] = None if model is None else {k: v for k, v in model.items() if k not in _BULKY_KEYS}
    return compact


#: The report with its plots and examples inlined (data: URIs): one object that a pre-signed URL
#: opens whole (the relative image links of ``report.html`` would need a signature each).
STANDALONE_REPORT_FILE = "report-standalone.html"
_IMG_SRC = re.compile(r'(<img\b[^>]*?\bsrc=")([^":]+)(")')
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def inline_images(html: str, root: Path) -> str:
    """``html`` with every relative ``<img src>`` under ``root`` replaced by a data: URI."""

    def replace(match: re.Match[str]) -> str:
        path = (root / match.group(2)).resolve()
        mime = _IMAGE_TYPES.get(path.suffix.lower())
        if mime is None or not path.is_file() or not path.is_relative_to(root.resolve()):
            return match.group(0)
        return f"{match.group(1)}data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}{match.group(3)}"

    return _IMG_SRC.sub(replace, html)


def report_prefix(cfg: PipelineConfig, job_name: str) -> str:
    """The S3 key prefix ``collect_evaluation`` publishes evaluation job ``job_name``'s report under
    (the evaluation task's "Evaluation report" link points there)."""
    return f"{cfg.prefixes.jobs}evaluate/{job_name}/report/"


def collect_evaluation(job_result: dict, *, cfg: PipelineConfig | None = None) -> dict:
    """Download the evaluation job's output, publish the report, return the headline.

    :raises EvaluationError: the job produced no readable ``evaluation.json``.
    """
    from sku_retraining.jobs.request import job_output_uri
    from sku_retraining.tasks.hooks import pipeline_hooks

    cfg = cfg or load_config_from_airflow()
    _, s3 = pipeline_hooks(cfg)
    description = (job_result or {}).get("Training")
    if not description:
        raise EvaluationError("the evaluation task returned no job description")
    job_name = description["TrainingJobName"]
    archive_uri = job_output_uri(description)
    bucket, key = s3.parse_s3_url(archive_uri)
    prefix = report_prefix(cfg, job_name)
    with tempfile.TemporaryDirectory(prefix="evaluation-") as tmp:
        archive = Path(tmp) / "output.tar.gz"
        try:
            s3.get_conn().download_file(bucket, key, str(archive))
        except Exception as exc:  # noqa: BLE001 - re-raised with where it looked
            raise EvaluationError(f"cannot read the evaluation job's output {archive_uri}: {exc}") from exc
        out = Path(tmp) / "out"
        with tarfile.open(archive) as tar:
            tar.extractall(out, filter="data")
        evaluation_path = out / EVALUATION_FILE
        if not evaluation_path.is_file():
            raise EvaluationError(f"evaluation job {job_name} wrote no {EVALUATION_FILE} ({archive_uri})")
        try:
            evaluation = json.loads(evaluation_path.read_text())
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{EVALUATION_FILE} of {job_name} is not valid JSON: {exc}") from None
        if (out / REPORT_FILE).is_file():
            (out / STANDALONE_REPORT_FILE).write_text(inline_images((out / REPORT_FILE).read_text(), out))
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            s3.load_file(path, key=prefix + str(path.relative_to(out)), bucket_name=cfg.data_bucket,
                         replace=True)
        local_report = None
        if cfg.job_backend == "local":
            target = cfg.fsx.local_path().parent / "reports" / job_name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(out, target)
            local_report = str(target / REPORT_FILE)
    report_uri = f"s3://{cfg.data_bucket}/{prefix}{REPORT_FILE}"
    log.info("Evaluation report: %s%s", report_uri, f"  (local copy: {local_report})" if local_report else "")
    return {
        "evaluation": headline(evaluation),
        "evaluation_s3_uri": f"s3://{cfg.data_bucket}/{prefix}{EVALUATION_FILE}",
        "report_s3_prefix": f"s3://{cfg.data_bucket}/{prefix}",
        "report_s3_uri": report_uri,
        "report_local_path": local_report,
        "evaluation_job": job_name,
    }
