"""deploy/render_config.py and deploy/build_and_push_image.py (no Docker engine, no AWS account)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from deploy_support import FILE_SYSTEM_ID, FOUNDATION, IAM

from deploy import build_and_push_image as bpi
from deploy.render_config import DEFAULT_STACKS, OUTPUT_MAP, RenderError, render_config


class _WithFsxStack:
    """moto's CloudFormation client, plus the fsx stack's outputs (moto cannot deploy FSx)."""

    def __init__(self, cfn, fsx_outputs: dict[str, str]) -> None:
        self._cfn, self._fsx = cfn, fsx_outputs

    def describe_stacks(self, *, StackName: str) -> dict:  # noqa: N803 - boto3's spelling
        if StackName == DEFAULT_STACKS["fsx"]:
            return {"Stacks": [{"Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in self._fsx.items()]}]}
        return self._cfn.describe_stacks(StackName=StackName)


FSX_OUTPUTS = {"FileSystemId": FILE_SYSTEM_ID, "MountName": "abcdefgh", "JobSubnetId": "subnet-0aaa"}


def test_render_config_from_the_stacks(deployed, tmp_path: Path) -> None:
    from sku_retraining.config import load_config

    client = _WithFsxStack(deployed["cfn"], FSX_OUTPUTS)
    config = render_config(cfn_client=client, image_tag="4f2c1a9d0e1b")
    out = deployed["foundation"]
    assert config["data_bucket"] == out["DataBucketName"]
    assert config["sagemaker"]["security_group_ids"] == [out["JobsSecurityGroupId"]]
    assert config["sagemaker"]["subnets"] == ["subnet-0aaa"]
    assert config["sagemaker"]["role_arn"] == deployed["iam"]["SageMakerRoleArn"]
    assert config["sagemaker"]["image_uri"] == f"{out['ImageRepositoryUri']}:4f2c1a9d0e1b"
    assert config["fsx"] == {"file_system_id": FILE_SYSTEM_ID, "mount_name": "abcdefgh"}
    assert config["notifications"]["sns_topic_arn"] == out["NotificationsTopicArn"]
    # ... and the project's own loader accepts it as the deployment's config file.
    path = tmp_path / "sku_retraining_config.json"
    path.write_text(json.dumps(config))
    cfg = load_config(environ={"SKU_RETRAINING_CONFIG": str(path)})
    assert cfg.job_backend == "sagemaker" and cfg.region_name == "eu-west-1"


def test_every_mapped_output_exists_in_the_templates() -> None:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    templates = Path(__file__).resolve().parents[2] / "deploy" / "cloudformation"
    for (kind, key), _path in OUTPUT_MAP.items():
        outputs = yaml.load((templates / f"{kind}.yaml").read_text(), Loader=Loader)["Outputs"]  # noqa: S506
        assert key in outputs, (kind, key)
    assert "ImageRepositoryUri" in yaml.load((templates / "foundation.yaml").read_text(), Loader=Loader)["Outputs"]  # noqa: S506
    assert (FOUNDATION, IAM) == (DEFAULT_STACKS["foundation"], DEFAULT_STACKS["iam"])


def test_render_config_names_a_missing_output(deployed) -> None:
    client = _WithFsxStack(deployed["cfn"], {"FileSystemId": FILE_SYSTEM_ID})
    with pytest.raises(RenderError, match="no output MountName"):
        render_config(cfn_client=client, image_tag="x")


# -- build_and_push_image -------------------------------------------------------------------------

@pytest.mark.parametrize(("region", "account"), [
    ("us-east-1", "763104351884"), ("eu-west-1", "763104351884"),
    ("af-south-1", "626614931356"), ("ap-east-1", "871362719292"), ("me-south-1", "217643126080"),
    ("eu-south-1", "692866216735"), ("ap-southeast-3", "907027046896"), ("il-central-1", "780543022126"),
])
def test_dlc_account_per_region(region: str, account: str) -> None:
    assert bpi.dlc_registry_account(region=region) == account


def test_unknown_region_is_refused() -> None:
    with pytest.raises(bpi.BuildError, match="no PyTorch"):
        bpi.dlc_registry_account(region="xx-nowhere-1")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_dirty_tree_is_refused(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    bpi.ensure_clean_tree(cwd=tmp_path)
    (tmp_path / "new.txt").write_text("untracked")
    with pytest.raises(bpi.BuildError, match="dirty git tree"):
        bpi.ensure_clean_tree(cwd=tmp_path)
    assert len(bpi.commit_tag(cwd=tmp_path)) == 12


def test_the_commands(tmp_path: Path) -> None:
    plan = bpi.plan_build(region="af-south-1", account="123456789012", repository="sku-retraining-training",
                          tag="4f2c1a9d0e1b")
    assert plan.image_uri == "123456789012.dkr.ecr.af-south-1.amazonaws.com/sku-retraining-training:4f2c1a9d0e1b"
    assert [c[-1] for c in plan.login_commands()] == [
        "626614931356.dkr.ecr.af-south-1.amazonaws.com", "123456789012.dkr.ecr.af-south-1.amazonaws.com"]
    build = plan.build_command()
    assert build[:3] == ["docker", "buildx", "build"]
    assert build[build.index("--platform") + 1] == "linux/amd64"
    assert build[build.index("-f") + 1] == "training_image/Dockerfile" and build[-1] == "."  # context: repo root
    assert "BASE_ACCOUNT=626614931356" in build and "REGION=af-south-1" in build
    assert "--push" in build and "--provenance=false" in build
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.tag = "other"  # type: ignore[misc]


def test_china_regions_are_refused() -> None:
    with pytest.raises(bpi.BuildError, match="amazonaws.com.cn"):
        _ = bpi.plan_build(region="cn-north-1", account="1", repository="r", tag="t").image_uri


def test_dry_run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bpi, "ensure_clean_tree", lambda **_: None)
    monkeypatch.setattr(bpi, "commit_tag", lambda **_: "0123456789ab")
    assert bpi.main(["--region", "il-central-1", "--account", "123456789012", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "123456789012.dkr.ecr.il-central-1.amazonaws.com/sku-retraining-training:0123456789ab"
    assert "780543022126.dkr.ecr.il-central-1.amazonaws.com" in err and "docker buildx build" in err


def test_cli_refuses_a_dirty_tree(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def dirty(**_: object) -> None:
        raise bpi.BuildError("refusing to build from a dirty git tree; commit or remove:\n?? x")

    monkeypatch.setattr(bpi, "ensure_clean_tree", dirty)
    assert bpi.main(["--region", "us-east-1", "--account", "1", "--dry-run"]) == 1
    assert "dirty git tree" in capsys.readouterr().err
