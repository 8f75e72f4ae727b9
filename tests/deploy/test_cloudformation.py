"""The templates: cfn-lint clean, and what moto can deploy of them, checked resource by resource."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_support import FOUNDATION, MOTO_LACKS, TEMPLATES


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, ...) as {"Fn::X": value} / {"Ref": v}."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _tag)


def load_template(name: str) -> dict:
    return yaml.load((TEMPLATES / name).read_text(), Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass


TEMPLATE_FILES = sorted(p.name for p in TEMPLATES.glob("*.yaml"))


def test_the_three_stacks_exist() -> None:
    assert TEMPLATE_FILES == ["foundation.yaml", "fsx.yaml", "iam.yaml"]


@pytest.mark.parametrize("name", TEMPLATE_FILES)
def test_cfn_lint_clean(name: str) -> None:
    exe = shutil.which("cfn-lint", path=str(Path(sys.executable).parent)) or "cfn-lint"
    result = subprocess.run([exe, str(TEMPLATES / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_moto_lacks_only_the_named_resource_types() -> None:
    """Every resource type is deployed in moto below, except the ones named in MOTO_LACKS."""
    from moto.cloudformation.parsing import resource_class_from_type

    types = {r["Type"] for name in TEMPLATE_FILES for r in load_template(name)["Resources"].values()}
    unsupported = {t for t in types if resource_class_from_type(t) is None}
    assert unsupported == set(MOTO_LACKS)


# -- foundation in moto --------------------------------------------------------------------------

def test_data_bucket(deployed) -> None:
    """moto's AWS::S3::Bucket applies BucketEncryption and Tags only; the rest is read from the
    template (versioning, public access block, ownership, lifecycle)."""
    s3 = deployed["session"].client("s3")
    bucket = deployed["foundation"]["DataBucketName"]
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"

    props = load_template("foundation.yaml")["Resources"]["DataBucket"]["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    block = props["PublicAccessBlockConfiguration"]
    assert all(block[k] is True for k in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"))
    assert props["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    lifecycle = {r["Id"]: r for r in props["LifecycleConfiguration"]["Rules"]}
    assert lifecycle["jobs"]["Prefix"] == "jobs/"
    assert lifecycle["checkpoints"]["Prefix"] == "jobs/checkpoints/"
    assert all(r["Status"] == "Enabled" for r in lifecycle.values())
    assert "AbortIncompleteMultipartUpload" in lifecycle["incomplete-multipart-uploads"]
    defaults = load_template("foundation.yaml")["Parameters"]
    # Overlapping rules: S3 applies the earliest expiration, so checkpoints must be the shorter.
    assert defaults["CheckpointRetentionDays"]["Default"] <= defaults["JobsRetentionDays"]["Default"]


def test_bucket_policy_denies_plain_http() -> None:
    """moto lacks AWS::S3::BucketPolicy: the statement is checked in the template."""
    policy = load_template("foundation.yaml")["Resources"]["DataBucketPolicy"]["Properties"]["PolicyDocument"]
    [deny] = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert deny["Action"] == "s3:*" and deny["Principal"] == "*"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert len(deny["Resource"]) == 2  # the bucket and its objects


def test_security_groups(deployed) -> None:
    ec2 = deployed["session"].client("ec2")
    out = deployed["foundation"]
    groups = {g["GroupId"]: g for g in ec2.describe_security_groups()["SecurityGroups"]}
    jobs, fsx = groups[out["JobsSecurityGroupId"]], groups[out["FsxSecurityGroupId"]]

    def rules(group: dict) -> set[tuple]:
        return {
            (p["IpProtocol"], p.get("FromPort"), p.get("ToPort"), pair["GroupId"])
            for p in group["IpPermissions"] for pair in p.get("UserIdGroupPairs", [])
        }

    assert ("-1", None, None, jobs["GroupId"]) in rules(jobs)  # SMDDP / EFA self rule
    for port in ((988, 988), (1018, 1023)):
        assert ("tcp", *port, jobs["GroupId"]) in rules(fsx)
        assert ("tcp", *port, fsx["GroupId"]) in rules(fsx)
        assert ("tcp", *port, fsx["GroupId"]) in rules(jobs)
    db_group = next(g for g in groups.values() if g.get("GroupName", "").find("DatabaseSecurityGroup") >= 0
                    or g.get("Description", "").startswith("Catalogue database"))
    assert rules(db_group) == {("tcp", 5432, 5432, out["AirflowSecurityGroupId"])}


def test_catalogue_database(deployed) -> None:
    rds = deployed["session"].client("rds")
    [db] = rds.describe_db_instances()["DBInstances"]
    assert db["Engine"] == "postgres"
    assert db["StorageEncrypted"] is True
    assert db["PubliclyAccessible"] is False
    assert db["Endpoint"]["Address"] == deployed["foundation"]["CatalogueDbEndpoint"]


def test_database_secrets_in_template() -> None:
    """moto lacks AWS::SecretsManager::*: the generated password and the connection are checked here."""
    resources = load_template("foundation.yaml")["Resources"]
    db = resources["CatalogueDb"]["Properties"]
    assert "{{resolve:secretsmanager:${CatalogueDbSecret}:SecretString:password}}" in db["MasterUserPassword"]["Fn::Sub"]
    assert "GenerateSecretString" in resources["CatalogueDbSecret"]["Properties"]
    conn = resources["CatalogueConnectionSecret"]["Properties"]
    assert conn["Name"] == {"Fn::Sub": "${AirflowConnectionsPrefix}/sku_catalogue"}
    template, _ = conn["SecretString"]["Fn::Sub"]
    rendered = template.replace("${Port}", "5432")
    body = json.loads(rendered)
    assert body["conn_type"] == "postgres" and body["extra"] == {"sslmode": "require"}


def test_image_repository(deployed) -> None:
    ecr = deployed["session"].client("ecr")
    [repo] = ecr.describe_repositories()["repositories"]
    assert repo["imageTagMutability"] == "IMMUTABLE"
    # moto's AWS::ECR::Repository drops ImageScanningConfiguration: read it from the template.
    props = load_template("foundation.yaml")["Resources"]["ImageRepository"]["Properties"]
    assert props["ImageScanningConfiguration"] == {"ScanOnPush": True}
    assert repo["repositoryUri"] == deployed["foundation"]["ImageRepositoryUri"]


def test_notifications_topic(deployed) -> None:
    sns = deployed["session"].client("sns")
    arns = [t["TopicArn"] for t in sns.list_topics()["Topics"]]
    assert deployed["foundation"]["NotificationsTopicArn"] in arns


def test_roles_deployed(deployed) -> None:
    iam = deployed["session"].client("iam")
    names = {r["RoleName"] for r in iam.list_roles()["Roles"]}
    assert {"sku-retraining-sagemaker", "sku-retraining-airflow"} <= names
    assert deployed["iam"]["SageMakerRoleArn"].endswith(":role/sku-retraining-sagemaker")


def test_fsx_template() -> None:
    """moto lacks FSx: the file system and its association are checked in the template."""
    resources = load_template("fsx.yaml")["Resources"]
    fs = resources["FileSystem"]["Properties"]
    assert fs["LustreConfiguration"]["DeploymentType"] == "PERSISTENT_2"
    assert fs["StorageCapacity"] == {"Ref": "StorageCapacityGiB"}
    dra = resources["BucketAssociation"]["Properties"]
    assert dra["FileSystemPath"] == "/"
    assert set(dra["S3"]["AutoImportPolicy"]["Events"]) == {"NEW", "CHANGED", "DELETED"}
    assert set(dra["S3"]["AutoExportPolicy"]["Events"]) == {"NEW", "CHANGED", "DELETED"}


def test_stack_names_match_render_config() -> None:
    from deploy.render_config import DEFAULT_STACKS

    assert DEFAULT_STACKS["foundation"] == FOUNDATION
