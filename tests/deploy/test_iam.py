"""Least privilege, both ways: every AWS action the code calls is allowed by the role that makes
the call (evaluated here against the policies *as deployed* in moto), and no statement grants
``*`` on ``*``.

Where the actions come from:

* **The Airflow role** — the pipeline package's source (``plugins/``), scanned: every method
  call whose name is an operation of the S3, SageMaker, FSx, SNS or CloudWatch Logs service
  models (botocore's own), plus the provider hook methods the code calls, mapped by the
  reviewed table :data:`HOOK_METHODS` (what those provider methods call underneath, read from
  apache-airflow-providers-amazon). A hook method in the table that the code no longer calls
  fails the test, so the table cannot go stale silently.
* **The SageMaker role** — what SageMaker does with the job's role (pull the image, write
  logs/metrics, create ENIs, read channels, write outputs and checkpoints): the reviewed table
  :data:`SAGEMAKER_JOB_ACTIONS`; the job code itself makes no AWS call (asserted).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from deploy_support import FILE_SYSTEM_ID, REGION

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"
JOB_CODE = ROOT / "training_image" / "code"
ACCOUNT = "123456789012"
SERVICES = {"s3": "s3", "sagemaker": "sagemaker", "fsx": "fsx", "sns": "sns", "logs": "logs"}

# Provider hook (and boto3 transfer) methods the code calls -> IAM actions they need.
HOOK_METHODS: dict[str, set[str]] = {
    # S3Hook
    "list_prefixes": {"s3:ListBucket"},
    "iter_file_metadata": {"s3:ListBucket"},
    "load_bytes": {"s3:PutObject"},
    "load_file": {"s3:PutObject"},
    # boto3's S3 transfer manager (multipart under the hood)
    "download_file": {"s3:GetObject"},
    "upload_file": {"s3:PutObject", "s3:AbortMultipartUpload"},
    "copy": {"s3:GetObject", "s3:PutObject"},
    "get_paginator": {"s3:ListBucket"},  # list_objects_v2 only (asserted below)
    # SageMakerHook: create_training_job -> check_training_config (S3 channels: HeadBucket,
    # prefix listing) and, with print_log, describe_training_job_with_log -> logs.
    "create_training_job": {"sagemaker:CreateTrainingJob", "sagemaker:AddTags", "iam:PassRole",
                            "s3:ListBucket", "sagemaker:DescribeTrainingJob",
                            "logs:DescribeLogStreams", "logs:GetLogEvents"},
    "check_training_status_with_log": {"sagemaker:DescribeTrainingJob", "logs:DescribeLogStreams",
                                       "logs:GetLogEvents"},
}
# Provider classes the code uses (referenced by name) -> the actions they call.
PROVIDER_CLASSES: dict[str, set[str]] = {
    "SnsNotifier": {"sns:Publish"},  # SnsHook.publish_to_target
    "SnsHook": {"sns:Publish"},
}

# Airflow reads its catalogue connection through the Secrets Manager backend (docs/deploy.md).
AIRFLOW_EXTRA_ACTIONS = {"secretsmanager:GetSecretValue", "fsx:CancelDataRepositoryTask", "sagemaker:ListTags"}

SAGEMAKER_JOB_ACTIONS = {
    "ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer",
    "ecr:BatchCheckLayerAvailability",
    "logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams",
    "cloudwatch:PutMetricData",
    "ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission", "ec2:DeleteNetworkInterface",
    "ec2:DeleteNetworkInterfacePermission", "ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs",
    "ec2:DescribeDhcpOptions", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups",
    "fsx:DescribeFileSystems",
    "s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
}


# -- the scan ------------------------------------------------------------------------------------

def _operation_index() -> dict[str, set[str]]:
    """snake_case method name -> {"service:Operation"} over :data:`SERVICES` (botocore models)."""
    import botocore.session
    from botocore import xform_name

    session = botocore.session.get_session()
    index: dict[str, set[str]] = {}
    for service, prefix in SERVICES.items():
        model = session.get_service_model(service)
        for op in model.operation_names:
            index.setdefault(xform_name(op), set()).add(f"{prefix}:{op}")
    return index


# A call counts as an AWS call when its receiver looks like a boto3 client or an AWS hook
# (``client.get_object``, ``self.hook.conn.stop_training_job``, ``fsx_client...``, ``s3.load_file``):
# this keeps ``re.search`` or psycopg's ``cursor.copy`` out of the list.
AWS_RECEIVER_WORDS = ("client", "hook", "conn", "s3", "sns", "fsx", "sagemaker", "logs")


def _called_methods(root: Path, *, aws_only: bool = False) -> dict[str, list[str]]:
    """Method name -> ["file:line", ...] for every ``x.name(...)`` call under ``root``."""
    calls: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                receiver = ast.unparse(node.func.value).lower()
                if aws_only and not any(w in receiver for w in AWS_RECEIVER_WORDS):
                    continue
                calls.setdefault(node.func.attr, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return calls


def _referenced_names(root: Path) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            name = node.id if isinstance(node, ast.Name) else node.name if isinstance(node, ast.alias) else None
            if name:
                names.setdefault(name.rsplit(".", 1)[-1], []).append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}")
    return names


# S3 object operations need s3:GetObject / s3:PutObject / s3:DeleteObject (not their own names).
S3_ACTION_FOR = {
    "HeadObject": "s3:GetObject", "GetObject": "s3:GetObject", "PutObject": "s3:PutObject",
    "CopyObject": "s3:PutObject", "DeleteObjects": "s3:DeleteObject", "DeleteObject": "s3:DeleteObject",
    "ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket", "HeadBucket": "s3:ListBucket",
}


def airflow_actions_from_code() -> dict[str, list[str]]:
    """IAM action -> where in plugins/ it is called."""
    index = _operation_index()
    calls = _called_methods(PLUGINS, aws_only=True)
    actions: dict[str, list[str]] = {}
    for name, where in _referenced_names(PLUGINS).items():
        for action in PROVIDER_CLASSES.get(name, ()):
            actions.setdefault(action, []).extend(where)
    for name, where in calls.items():
        if name in HOOK_METHODS:
            for action in HOOK_METHODS[name]:
                actions.setdefault(action, []).extend(where)
        elif name in index:
            ops = index[name]
            assert len(ops) == 1, f"{name} ({where[0]}) is an operation of several services: {ops}; map it"
            [op] = ops
            service, operation = op.split(":")
            action = S3_ACTION_FOR.get(operation, op) if service == "s3" else op
            actions.setdefault(action, []).extend(where)
    return actions


def test_hook_table_is_current() -> None:
    calls = _called_methods(PLUGINS, aws_only=True)
    stale = sorted(set(HOOK_METHODS) - set(calls))
    assert not stale, f"HOOK_METHODS lists methods plugins/ no longer calls: {stale}"
    names = _referenced_names(PLUGINS)
    stale = sorted(set(PROVIDER_CLASSES) - set(names) - {"SnsHook"})
    assert not stale, f"PROVIDER_CLASSES lists classes plugins/ no longer uses: {stale}"


def test_only_list_objects_v2_is_paginated() -> None:
    for path in PLUGINS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get_paginator":
                assert [a.value for a in node.args] == ["list_objects_v2"], f"{path}:{node.lineno}"


def test_job_code_makes_no_aws_call() -> None:
    for path in JOB_CODE.rglob("*.py"):
        text = path.read_text()
        assert "boto3" not in text and "botocore" not in text, path


def test_the_scan_finds_the_calls_we_know() -> None:
    found = airflow_actions_from_code()
    for action in ("s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:DeleteObject",
                   "sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob", "sagemaker:CreateTrainingJob",
                   "fsx:CreateDataRepositoryTask", "fsx:DescribeDataRepositoryTasks", "sns:Publish",
                   "logs:GetLogEvents"):
        assert action in found, action


# -- the policy evaluator ----------------------------------------------------------------------------

def _listify(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _condition_ok(condition: dict[str, dict[str, Any]], context: dict[str, str]) -> bool:
    for operator, pairs in condition.items():
        for key, expected in pairs.items():
            if key not in context:
                return False
            values = [str(v) for v in _listify(expected)]
            actual = context[key]
            if operator == "StringEquals" and actual not in values:
                return False
            if operator == "StringLike" and not any(fnmatch.fnmatchcase(actual, v) for v in values):
                return False
            if operator == "Bool" and actual.lower() not in [v.lower() for v in values]:
                return False
            if operator not in ("StringEquals", "StringLike", "Bool"):
                return False
    return True


def _matches(statement: dict, action: str, resource: str, context: dict[str, str]) -> bool:
    if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _listify(statement.get("Action", []))):
        return False
    if "NotResource" in statement:
        if any(fnmatch.fnmatchcase(resource, r) for r in _listify(statement["NotResource"])):
            return False
    elif not any(fnmatch.fnmatchcase(resource, r) for r in _listify(statement.get("Resource", []))):
        return False
    return _condition_ok(statement.get("Condition", {}), context)


def allowed(statements: list[dict], action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    context = context or {}
    matching = [s for s in statements if _matches(s, action, resource, context)]
    return any(s["Effect"] == "Allow" for s in matching) and not any(s["Effect"] == "Deny" for s in matching)


def role_statements(iam, role_name: str) -> list[dict]:
    def doc(raw: Any) -> dict:
        if not isinstance(raw, str):
            return raw
        raw = urllib.parse.unquote(raw)
        try:
            return json.loads(raw)
        except json.JSONDecodeError:  # moto keeps a CloudFormation inline policy as repr(dict)
            return ast.literal_eval(raw)

    statements: list[dict] = []
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        statements += _listify(doc(iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"])["Statement"])
    for attached in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        policy = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]
        version = iam.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=policy["DefaultVersionId"])
        statements += _listify(doc(version["PolicyVersion"]["Document"])["Statement"])
    assert statements, role_name
    return statements


# -- what each call is made on ---------------------------------------------------------------------------

def _requests(action: str, deployed: dict) -> list[tuple[str, dict[str, str]]]:
    """(resource ARN, condition context) pairs ``action`` is called with by this pipeline."""
    from sku_retraining.config import Prefixes
    from sku_retraining.jobs.naming import attempt_names

    out = deployed["foundation"]
    bucket = out["DataBucketName"]
    job = attempt_names("train", "sku_retraining", "manual__2026-01-01T00:00:00+00:00", 1)[0]
    prefixes = [getattr(Prefixes(), f) for f in ("incoming", "datasets", "models", "jobs")]
    log_group = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/sagemaker/TrainingJobs"
    service, name = action.split(":")
    if action == "s3:ListBucket":
        return [(f"arn:aws:s3:::{bucket}", {"s3:prefix": f"{p}x"}) for p in prefixes]
    if service == "s3":
        return [(f"arn:aws:s3:::{bucket}/{p}batch-1/x.jpg", {}) for p in prefixes]
    if service == "sagemaker":
        return [(f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{job}", {})]
    if action == "iam:PassRole":
        return [(deployed["iam"]["SageMakerRoleArn"], {"iam:PassedToService": "sagemaker.amazonaws.com"})]
    if service == "logs":
        return [(f"{log_group}:log-stream:{job}/algo-1-1700000000", {})]
    if action == "fsx:CreateDataRepositoryTask":
        return [(f"arn:aws:fsx:{REGION}:{ACCOUNT}:file-system/{FILE_SYSTEM_ID}", {}),
                (f"arn:aws:fsx:{REGION}:{ACCOUNT}:task/task-0123456789abcdef0", {})]
    if service == "fsx":
        return [(f"arn:aws:fsx:{REGION}:{ACCOUNT}:task/task-0123456789abcdef0", {})]
    if action == "sns:Publish":
        return [(out["NotificationsTopicArn"], {})]
    if action == "secretsmanager:GetSecretValue":
        return [(arn, {}) for arn in deployed["secrets"].values()]
    raise AssertionError(f"no resource known for {action}: add it to _requests")


def _job_requests(action: str, deployed: dict) -> list[tuple[str, dict[str, str]]]:
    out = deployed["foundation"]
    bucket = out["DataBucketName"]
    log_group = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/sagemaker/TrainingJobs"
    service = action.split(":")[0]
    if action == "s3:ListBucket":
        return [(f"arn:aws:s3:::{bucket}", {"s3:prefix": p}) for p in ("datasets/snap/", "models/sku/", "jobs/checkpoints/")]
    if action == "s3:GetObject":  # channels: dataset snapshot, the production model (warm start)
        return [(f"arn:aws:s3:::{bucket}/{k}", {}) for k in ("datasets/snap/train.csv", "models/sku/v0001/model.tar.gz")]
    if service == "s3":  # outputs and checkpoints
        return [(f"arn:aws:s3:::{bucket}/{k}", {}) for k in ("jobs/train/sku-train-x/output/model.tar.gz",
                                                             "jobs/checkpoints/sku-train-x/ckpt.pt")]
    if action == "ecr:GetAuthorizationToken" or service == "ec2":
        return [("*", {})]
    if service == "ecr":
        return [(out["ImageRepositoryArn"], {})]
    if action == "cloudwatch:PutMetricData":
        return [("*", {"cloudwatch:namespace": "/aws/sagemaker/TrainingJobs"})]
    if service == "logs":
        return [(log_group, {}), (f"{log_group}:log-stream:sku-train-x/algo-1-1", {})]
    if action == "fsx:DescribeFileSystems":
        return [(f"arn:aws:fsx:{REGION}:{ACCOUNT}:file-system/{FILE_SYSTEM_ID}", {})]
    raise AssertionError(f"no resource known for {action}")


def missing_actions(statements: list[dict], actions: set[str], requests) -> list[str]:
    return sorted(
        f"{action} on {resource} {context or ''}".strip()
        for action in actions
        for resource, context in requests(action)
        if not allowed(statements, action, resource, context)
    )


# -- the tests --------------------------------------------------------------------------------------------

def test_airflow_role_allows_every_call_the_code_makes(deployed) -> None:
    iam = deployed["session"].client("iam")
    statements = role_statements(iam, "sku-retraining-airflow")
    actions = set(airflow_actions_from_code()) | AIRFLOW_EXTRA_ACTIONS
    assert missing_actions(statements, actions, lambda a: _requests(a, deployed)) == []


def test_sagemaker_role_allows_what_the_jobs_need(deployed) -> None:
    iam = deployed["session"].client("iam")
    statements = role_statements(iam, "sku-retraining-sagemaker")
    assert missing_actions(statements, SAGEMAKER_JOB_ACTIONS, lambda a: _job_requests(a, deployed)) == []


@pytest.mark.parametrize("role", ["sku-retraining-airflow", "sku-retraining-sagemaker"])
def test_no_statement_grants_everything(deployed, role: str) -> None:
    iam = deployed["session"].client("iam")
    for s in role_statements(iam, role):
        if s["Effect"] != "Allow":
            continue
        actions = _listify(s.get("Action", []))
        assert "*" not in actions and not any(a.endswith(":*") for a in actions), s
        assert "NotAction" not in s, s


def test_narrowing(deployed) -> None:
    """What the roles must not do: pass the role elsewhere, touch other jobs, read other prefixes."""
    iam = deployed["session"].client("iam")
    airflow = role_statements(iam, "sku-retraining-airflow")
    job_role = deployed["iam"]["SageMakerRoleArn"]
    assert not allowed(airflow, "iam:PassRole", job_role, {"iam:PassedToService": "ec2.amazonaws.com"})
    assert not allowed(airflow, "iam:PassRole", job_role.replace("sagemaker", "admin"),
                       {"iam:PassedToService": "sagemaker.amazonaws.com"})
    assert not allowed(airflow, "sagemaker:CreateTrainingJob", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/other-job")
    bucket = deployed["foundation"]["DataBucketName"]
    jobs = role_statements(iam, "sku-retraining-sagemaker")
    assert not allowed(jobs, "s3:GetObject", f"arn:aws:s3:::{bucket}/incoming/b/x.jpg")
    assert not allowed(jobs, "s3:PutObject", f"arn:aws:s3:::{bucket}/models/sku/production.json")
    assert not allowed(jobs, "s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": "incoming/"})


def test_the_check_fails_when_an_action_is_removed(deployed) -> None:
    """The evaluator is not vacuous: drop one action from the deployed Airflow policy's
    statements and the check reports exactly the calls that needed it."""
    iam = deployed["session"].client("iam")
    statements = role_statements(iam, "sku-retraining-airflow")
    crippled = [
        {**s, "Action": [a for a in _listify(s["Action"]) if a != "sagemaker:StopTrainingJob"]}
        for s in statements
    ]
    actions = set(airflow_actions_from_code()) | AIRFLOW_EXTRA_ACTIONS
    missing = missing_actions(crippled, actions, lambda a: _requests(a, deployed))
    assert len(missing) == 1 and missing[0].startswith("sagemaker:StopTrainingJob on arn:aws:sagemaker:")
