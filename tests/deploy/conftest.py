"""Deploy the CloudFormation templates into moto (what moto's CloudFormation supports).

moto 5.2.5's CloudFormation has no AWS::FSx::*, AWS::S3::BucketPolicy and
AWS::SecretsManager::* resources: it skips them with a warning. So

* the fsx stack is linted only (tests/deploy/test_cloudformation.py), never deployed here;
* the iam stack takes the file system id as a parameter (a made-up ``fs-`` id here) and the
  two secret ARNs as exports of the foundation stack, which moto leaves without a value: the
  test gives those two exports the ARNs of secrets created with moto's Secrets Manager API
  (:func:`_fill_secret_exports`, the only stand-in). The bucket policy and the secrets
  themselves are checked in the template text.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_support import FILE_SYSTEM_ID, FOUNDATION, IAM, REGION, TEMPLATES


def _params(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"ParameterKey": k, "ParameterValue": v} for k, v in values.items()]


def stack_outputs(cfn, name: str) -> dict[str, str]:
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def _fill_secret_exports(cfn, values: dict[str, str]) -> None:
    """moto exports the outputs of resources it skipped with no value; give the two secret
    exports the ARNs of secrets made with moto's Secrets Manager API (the only stand-in)."""
    from moto.cloudformation.models import cloudformation_backends
    from moto.cloudformation.parsing import Export
    from moto.core import DEFAULT_ACCOUNT_ID

    exports = cloudformation_backends[DEFAULT_ACCOUNT_ID][REGION].exports
    for name, value in values.items():
        assert exports[name].value is None, f"moto now deploys {name}: drop the stand-in"
        exports[name] = Export(exports[name].exporting_stack_id, name, value)


@pytest.fixture(scope="module")
def deployed(monkeypatch_module: Any) -> Iterator[dict[str, Any]]:
    """The foundation and iam stacks in moto; yields clients and outputs."""
    import boto3
    from moto import mock_aws

    with mock_aws(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # moto: "not supported by CloudFormation"
        session = boto3.Session(region_name=REGION)
        ec2 = session.client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24", AvailabilityZone=f"{REGION}{az}")["Subnet"]["SubnetId"]
            for i, az in enumerate("ab")
        ]
        cfn = session.client("cloudformation")
        cfn.create_stack(
            StackName=FOUNDATION, TemplateBody=(TEMPLATES / "foundation.yaml").read_text(),
            Parameters=_params({"VpcId": vpc, "PrivateSubnetIds": ",".join(subnets)}),
        )
        foundation = stack_outputs(cfn, FOUNDATION)
        sm = session.client("secretsmanager")
        db_secret = sm.create_secret(Name="sku-retraining/catalogue-db/master", SecretString="{}")["ARN"]
        conn_secret = sm.create_secret(Name="airflow/connections/sku_catalogue", SecretString="{}")["ARN"]
        _fill_secret_exports(cfn, {
            f"{FOUNDATION}-CatalogueDbSecretArn": db_secret,
            f"{FOUNDATION}-CatalogueConnectionSecretArn": conn_secret,
        })
        cfn.create_stack(
            StackName=IAM, TemplateBody=(TEMPLATES / "iam.yaml").read_text(),
            Capabilities=["CAPABILITY_NAMED_IAM"],
            Parameters=_params({"FileSystemId": FILE_SYSTEM_ID, "MwaaEnvironmentName": "sku-retraining"}),
        )
        iam_outputs = stack_outputs(cfn, IAM)
        yield {
            "session": session, "cfn": cfn, "vpc": vpc, "subnets": subnets,
            "foundation": foundation, "iam": iam_outputs,
            "secrets": {"db": db_secret, "connection": conn_secret},
        }


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    """Fake credentials for the module's moto session (never a real account)."""
    mp = pytest.MonkeyPatch()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        mp.setenv(key, "testing")
    mp.delenv("AWS_PROFILE", raising=False)
    mp.setenv("AWS_DEFAULT_REGION", REGION)
    yield mp
    mp.undo()
