"""Render the deployment's pipeline configuration from the CloudFormation stacks' outputs.

The three stacks (``deploy/cloudformation/{foundation,fsx,iam}.yaml``) have outputs that map
one to one onto :class:`sku_retraining.config.PipelineConfig`; this prints the JSON to store as
the Airflow deployment's config file, the one ``$SKU_RETRAINING_CONFIG`` names (data_bucket and the
other deployment settings belong there, not in the Variable)::

    python -m deploy.render_config --region eu-west-1 --image-tag 4f2c1a9d0e1b > config.json

The image URI is the repository URI plus the tag ``deploy/build_and_push_image.py`` printed
(or ``--image-uri``). Nothing here talks to Airflow or writes anywhere but stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_STACKS = {
    "foundation": "sku-retraining-foundation",
    "fsx": "sku-retraining-fsx",
    "iam": "sku-retraining-iam",
}

# (stack, output key) -> config path. Every value of the rendered configuration comes from here
# (plus the image tag); tests/deploy checks each path exists in PipelineConfig.
OUTPUT_MAP: dict[tuple[str, str], tuple[str, ...]] = {
    ("foundation", "DataBucketName"): ("data_bucket",),
    ("foundation", "RegionName"): ("region_name",),
    ("foundation", "JobsSecurityGroupId"): ("sagemaker", "security_group_ids"),
    ("foundation", "NotificationsTopicArn"): ("notifications", "sns_topic_arn"),
    ("fsx", "FileSystemId"): ("fsx", "file_system_id"),
    ("fsx", "MountName"): ("fsx", "mount_name"),
    ("fsx", "JobSubnetId"): ("sagemaker", "subnets"),
    ("iam", "SageMakerRoleArn"): ("sagemaker", "role_arn"),
}
LIST_PATHS = {("sagemaker", "security_group_ids"), ("sagemaker", "subnets")}


class RenderError(RuntimeError):
    """A stack or an output is missing; the message names it."""


def stack_outputs(cfn_client: Any, stack_name: str) -> dict[str, str]:
    """``OutputKey -> OutputValue`` of one stack (``describe_stacks``)."""
    stacks = cfn_client.describe_stacks(StackName=stack_name)["Stacks"]
    if not stacks:
        raise RenderError(f"stack {stack_name} not found")
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def render_config(
    *,
    cfn_client: Any,
    stacks: dict[str, str] | None = None,
    image_tag: str | None = None,
    image_uri: str | None = None,
) -> dict[str, Any]:
    """The deployment's configuration (a dict for ``sku_retraining_config``).

    :param cfn_client: a boto3 CloudFormation client of the deployment's region.
    :param stacks: ``{"foundation"|"fsx"|"iam": stack name}``; defaults: :data:`DEFAULT_STACKS`.
    :param image_tag: the training image's tag (the git commit); appended to the repository URI.
    :param image_uri: the full image URI instead of ``image_tag``.
    """
    names = {**DEFAULT_STACKS, **(stacks or {})}
    outputs = {kind: stack_outputs(cfn_client, name) for kind, name in names.items()}
    config: dict[str, Any] = {"job_backend": "sagemaker"}
    for (kind, key), path in OUTPUT_MAP.items():
        if key not in outputs[kind]:
            raise RenderError(f"stack {names[kind]} has no output {key}")
        value: Any = outputs[kind][key]
        if path in LIST_PATHS:
            value = [v for v in value.split(",") if v]
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    if image_uri is None:
        if not image_tag:
            raise RenderError("give --image-tag (the tag build_and_push_image printed) or --image-uri")
        image_uri = f"{outputs['foundation']['ImageRepositoryUri']}:{image_tag}"
    config["sagemaker"]["image_uri"] = image_uri
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--region", required=True)
    parser.add_argument("--image-tag", help="the training image tag (git commit)")
    parser.add_argument("--image-uri", help="the full training image URI (instead of --image-tag)")
    for kind, default in DEFAULT_STACKS.items():
        parser.add_argument(f"--{kind}-stack", default=default, help=f"default: {default}")
    args = parser.parse_args(argv)

    import boto3

    client = boto3.client("cloudformation", region_name=args.region)
    try:
        config = render_config(
            cfn_client=client,
            stacks={kind: getattr(args, f"{kind}_stack") for kind in DEFAULT_STACKS},
            image_tag=args.image_tag,
            image_uri=args.image_uri,
        )
    except RenderError as exc:
        print(f"render_config: {exc}", file=sys.stderr)
        return 2
    json.dump(config, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
