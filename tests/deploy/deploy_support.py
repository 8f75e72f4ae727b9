"""Shared by tests/deploy: template paths, the moto deployment's names, what moto lacks."""

from __future__ import annotations

from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "cloudformation"
REGION = "eu-west-1"
FOUNDATION = "sku-retraining-foundation"
IAM = "sku-retraining-iam"
FILE_SYSTEM_ID = "fs-0123456789abcdef0"
# Resource types moto 5.2.5's CloudFormation skips (it warns and creates nothing).
MOTO_LACKS = ("AWS::FSx::FileSystem", "AWS::FSx::DataRepositoryAssociation", "AWS::S3::BucketPolicy",
              "AWS::SecretsManager::Secret", "AWS::SecretsManager::SecretTargetAttachment")
