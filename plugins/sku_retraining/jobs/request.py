"""Build and validate SageMaker ``CreateTrainingJob`` requests as plain dicts.

Augmentation, training and evaluation are all SageMaker *training jobs* of the same image,
with a different entry point (``sagemaker_program``). The request is validated before it is
sent or run locally: first against botocore's own service model for ``CreateTrainingJob``
(required members, types, lengths, ranges, and the model's enums and patterns), then against
the rules the service model cannot express (FSx paths, VPC for FSx, SMDDP instance types).
Every error names the offending field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import regex

#: Instance types that SMDDP supports (AWS docs: "Supported frameworks, AWS Regions, and
#: instances types" for the SageMaker distributed data parallelism library).
SMDDP_INSTANCE_TYPES = frozenset({"ml.p4d.24xlarge", "ml.p4de.24xlarge", "ml.p3.16xlarge", "ml.p3dn.24xlarge"})
from sku_contracts.files import INSTANCE_TYPE_HP, PROGRAM_HP, SMDDP_ENABLED_HP  # noqa: E402,F401

ChannelSource = Literal["fsx", "s3"]


class RequestValidationError(ValueError):
    """The request would be refused by SageMaker; the message lists each bad field."""


@dataclass(frozen=True)
class Channel:
    """One input channel. ``path`` is relative to the FSx root (``fsx``) or an S3 URI (``s3``)."""

    name: str
    source: ChannelSource
    path: str
    access_mode: Literal["ro", "rw"] = "ro"
    content_type: str | None = None


@dataclass(frozen=True)
class FsxTarget:
    file_system_id: str
    mount_name: str

    def directory_path(self, relative: str) -> str:
        relative = relative.strip("/")
        return f"/{self.mount_name}/{relative}" if relative else f"/{self.mount_name}"


@dataclass(frozen=True)
class JobSpec:
    """Everything that varies between our jobs; :func:`build_request` makes the dict."""

    job_name: str
    program: str  # entry point inside the image's /opt/ml/code, e.g. "train.py"
    image_uri: str
    role_arn: str
    output_s3_uri: str
    instance_type: str
    instance_count: int = 1
    volume_size_gb: int = 100
    max_runtime_seconds: int = 5 * 24 * 3600
    channels: tuple[Channel, ...] = ()
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    subnets: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    fsx: FsxTarget | None = None
    checkpoint_s3_uri: str | None = None
    use_spot: bool = False
    max_wait_seconds: int | None = None
    smddp: bool = False
    network_isolation: bool = False
    metric_definitions: tuple[Mapping[str, str], ...] = ()


def job_output_uri(description: Mapping[str, Any], archive: str = "output.tar.gz") -> str:
    """Where SageMaker (and the local backend) put a finished job's ``model.tar.gz`` /
    ``output.tar.gz``: ``<S3OutputPath>/<job name>/output/<archive>``."""
    base = description["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    return f"{base}/{description['TrainingJobName']}/output/{archive}"


def _hp_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_request(spec: JobSpec) -> dict[str, Any]:
    """The ``CreateTrainingJob`` request for ``spec`` (not yet validated)."""
    hyperparameters = {k: _hp_value(v) for k, v in spec.hyperparameters.items()}
    hyperparameters[PROGRAM_HP] = spec.program
    if spec.smddp:
        # The DLC's launcher reads these to start SMDDP with mpirun across the instances.
        hyperparameters[SMDDP_ENABLED_HP] = "true"
        hyperparameters[INSTANCE_TYPE_HP] = spec.instance_type
    channels = []
    for channel in spec.channels:
        if channel.source == "fsx":
            if spec.fsx is None:
                raise RequestValidationError(f"InputDataConfig.{channel.name}: FSx channel but no FSx file system")
            data_source = {
                "FileSystemDataSource": {
                    "FileSystemId": spec.fsx.file_system_id,
                    "FileSystemType": "FSxLustre",
                    "FileSystemAccessMode": channel.access_mode,
                    "DirectoryPath": spec.fsx.directory_path(channel.path),
                }
            }
        else:
            data_source = {
                "S3DataSource": {
                    "S3DataType": "S3Prefix",
                    "S3Uri": channel.path,
                    "S3DataDistributionType": "FullyReplicated",
                }
            }
        entry: dict[str, Any] = {"ChannelName": channel.name, "DataSource": data_source, "InputMode": "File"}
        if channel.content_type:
            entry["ContentType"] = channel.content_type
        channels.append(entry)

    stopping: dict[str, int] = {"MaxRuntimeInSeconds": int(spec.max_runtime_seconds)}
    if spec.use_spot:
        stopping["MaxWaitTimeInSeconds"] = int(spec.max_wait_seconds or spec.max_runtime_seconds * 2)
    request: dict[str, Any] = {
        "TrainingJobName": spec.job_name,
        "AlgorithmSpecification": {
            "TrainingImage": spec.image_uri,
            "TrainingInputMode": "File",
            **({"MetricDefinitions": [dict(m) for m in spec.metric_definitions]} if spec.metric_definitions else {}),
        },
        "RoleArn": spec.role_arn,
        "HyperParameters": hyperparameters,
        "InputDataConfig": channels,
        "OutputDataConfig": {"S3OutputPath": spec.output_s3_uri},
        "ResourceConfig": {
            "InstanceType": spec.instance_type,
            "InstanceCount": int(spec.instance_count),
            "VolumeSizeInGB": int(spec.volume_size_gb),
        },
        "StoppingCondition": stopping,
        "EnableNetworkIsolation": bool(spec.network_isolation),
        "EnableManagedSpotTraining": bool(spec.use_spot),
        "Tags": [{"Key": k, "Value": str(v)[:256]} for k, v in sorted(spec.tags.items())],
    }
    if spec.environment:
        request["Environment"] = dict(spec.environment)
    if spec.subnets or spec.security_group_ids:
        request["VpcConfig"] = {"Subnets": list(spec.subnets), "SecurityGroupIds": list(spec.security_group_ids)}
    if spec.checkpoint_s3_uri:
        request["CheckpointConfig"] = {"S3Uri": spec.checkpoint_s3_uri, "LocalPath": "/opt/ml/checkpoints"}
    return request


@cache
def _input_shape():
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return model.operation_model("CreateTrainingJob").input_shape


@cache
def _compiled(pattern: str | None) -> regex.Pattern | None:
    """The model's patterns are Java regexes. The ``regex`` package reads them, Unicode
    property classes included (``\\p{L}``, ``\\p{Z}``, ``\\p{N}``, ``\\p{Alnum}``: the
    SageMaker tag patterns); one it cannot read is an error here, not a check skipped."""
    if not pattern or pattern == ".*":
        return None
    return regex.compile(pattern, flags=regex.DOTALL)


def _walk_constraints(shape, value: Any, path: str, errors: list[str]) -> None:
    """Check the model's enums and patterns, which botocore's ParamValidator leaves out."""
    kind = shape.type_name
    if kind == "structure" and isinstance(value, Mapping):
        for name, member in shape.members.items():
            if name in value:
                _walk_constraints(member, value[name], f"{path}.{name}" if path else name, errors)
    elif kind == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            _walk_constraints(shape.member, item, f"{path}[{i}]", errors)
    elif kind == "map" and isinstance(value, Mapping):
        for key, item in value.items():
            _walk_constraints(shape.key, key, f"{path} key {key!r}", errors)
            _walk_constraints(shape.value, item, f"{path}[{key!r}]", errors)
    elif kind == "string" and isinstance(value, str):
        if shape.enum and value not in shape.enum:
            errors.append(f"{path}: {value!r} is not one of the allowed values ({len(shape.enum)} allowed)")
        pattern = _compiled(shape.metadata.get("pattern"))
        if pattern is not None and not pattern.fullmatch(value):
            errors.append(f"{path}: {value!r} does not match the pattern {pattern.pattern}")


def model_constraint_errors(shape, value: Any, path: str = "") -> list[str]:
    """The enum and pattern violations of ``value`` against a botocore input ``shape`` (any
    service: the FSx tests use it too)."""
    errors: list[str] = []
    _walk_constraints(shape, value, path, errors)
    return errors


def validate_request(request: Mapping[str, Any], *, fsx_mount_name: str | None = None) -> None:
    """Raise :class:`RequestValidationError` listing every problem of ``request``."""
    from botocore.validate import ParamValidator

    errors: list[str] = []
    report = ParamValidator().validate(dict(request), _input_shape())
    if report.has_errors():
        errors.extend(line.strip() for line in report.generate_report().splitlines() if line.strip())
    _walk_constraints(_input_shape(), request, "", errors)

    hyperparameters = request.get("HyperParameters") or {}
    for key, value in hyperparameters.items():
        if not isinstance(value, str):
            errors.append(f"HyperParameters[{key!r}]: must be a string, got {type(value).__name__}")
    if PROGRAM_HP not in hyperparameters:
        errors.append(f"HyperParameters: {PROGRAM_HP} (the entry point) is required")

    uses_fsx = False
    for i, channel in enumerate(request.get("InputDataConfig") or []):
        fsx = (channel.get("DataSource") or {}).get("FileSystemDataSource")
        if not fsx:
            continue
        uses_fsx = True
        where = f"InputDataConfig[{i}] ({channel.get('ChannelName')}).DataSource.FileSystemDataSource"
        path = fsx.get("DirectoryPath", "")
        if fsx_mount_name and not (path == f"/{fsx_mount_name}" or path.startswith(f"/{fsx_mount_name}/")):
            errors.append(f"{where}.DirectoryPath: {path!r} must start with /{fsx_mount_name} (the FSx MountName)")
        if "/../" in f"{path}/" or "//" in path:
            errors.append(f"{where}.DirectoryPath: {path!r} must be a normalised absolute path")
        if not str(fsx.get("FileSystemId", "")).startswith("fs-"):
            errors.append(f"{where}.FileSystemId: {fsx.get('FileSystemId')!r} is not an FSx file system id")
    if uses_fsx:
        vpc = request.get("VpcConfig") or {}
        if not vpc.get("Subnets") or not vpc.get("SecurityGroupIds"):
            errors.append("VpcConfig: FSx for Lustre channels need VpcConfig with Subnets and SecurityGroupIds")

    resource = request.get("ResourceConfig") or {}
    if hyperparameters.get(SMDDP_ENABLED_HP) == "true":
        if resource.get("InstanceType") not in SMDDP_INSTANCE_TYPES:
            errors.append(
                f"ResourceConfig.InstanceType: {resource.get('InstanceType')!r} does not support SMDDP "
                f"(supported: {', '.join(sorted(SMDDP_INSTANCE_TYPES))})"
            )
        if hyperparameters.get(INSTANCE_TYPE_HP) != resource.get("InstanceType"):
            errors.append(f"HyperParameters[{INSTANCE_TYPE_HP!r}]: must equal ResourceConfig.InstanceType")
    if request.get("EnableManagedSpotTraining"):
        stopping = request.get("StoppingCondition") or {}
        if stopping.get("MaxWaitTimeInSeconds", 0) < stopping.get("MaxRuntimeInSeconds", 0):
            errors.append("StoppingCondition.MaxWaitTimeInSeconds: required for spot and >= MaxRuntimeInSeconds")
        if not request.get("CheckpointConfig"):
            errors.append("CheckpointConfig: spot training without checkpoints restarts from scratch")
    if errors:
        raise RequestValidationError(
            f"CreateTrainingJob request {request.get('TrainingJobName')!r} is invalid:\n  - " + "\n  - ".join(errors)
        )
