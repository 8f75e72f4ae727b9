"""Build the training image for linux/amd64 FROM the region's SMDDP DLC, tag it with the git
commit, push it to the project's ECR repository and print its ``image_uri``.

    python -m deploy.build_and_push_image --region eu-west-1 [--repository sku-retraining-training]
    python -m deploy.build_and_push_image --region af-south-1 --account 123456789012 --dry-run

* Refuses a dirty git tree (modified, staged or untracked files): the tag must name exactly
  what is in the image.
* The DLC registry account differs by region (opt-in regions such as af-south-1, ap-east-1,
  me-south-1, eu-south-1, il-central-1 have their own); it is read from the installed
  ``sagemaker-core`` package's ``image_uri_config/pytorch.json``, the SDK's own table.
* Build context = the repository root, ``-f training_image/Dockerfile`` (the image copies the
  shared contracts package ``plugins/sku_contracts/``); ``.dockerignore`` keeps the rest out.
* ECR tags are immutable: when the commit's tag is already there, nothing is built or pushed
  and the existing URI is printed.
* ``--dry-run`` prints the commands instead of running them (no Docker, no AWS calls when
  ``--account`` is given).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = "training_image/Dockerfile"
# The DLC the Dockerfile extends (keep in step with its BASE_TAG): SMDDP ships in 2.2-2.5 only.
DLC_REPOSITORY = "pytorch-training"
DLC_FRAMEWORK_VERSION = "2.5.1"
DEFAULT_REPOSITORY = "sku-retraining-training"

Runner = Callable[[Sequence[str]], str]


class BuildError(RuntimeError):
    pass


def dlc_registry_account(*, region: str, framework_version: str = DLC_FRAMEWORK_VERSION) -> str:
    """The AWS account hosting the PyTorch training DLCs in ``region`` (sagemaker-core's table)."""
    table = json.loads(
        resources.files("sagemaker.core").joinpath("image_uri_config", "pytorch.json").read_text()
    )
    training = table["training"]
    version = training.get("version_aliases", {}).get(framework_version, framework_version)
    try:
        registries = training["versions"][version]["registries"]
    except KeyError as exc:
        raise BuildError(f"sagemaker-core knows no PyTorch training DLC {framework_version}") from exc
    if region not in registries:
        raise BuildError(f"no PyTorch {framework_version} training DLC in region {region!r}")
    return registries[region]


def ecr_domain(region: str) -> str:
    if region.startswith("cn-"):
        raise BuildError(
            "China regions use amazonaws.com.cn registries, which training_image/Dockerfile's FROM "
            "does not spell; build there by hand"
        )
    return "amazonaws.com"


def git(args: Sequence[str], *, cwd: Path = REPO_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def ensure_clean_tree(*, cwd: Path = REPO_ROOT) -> None:
    """Raise unless ``git status --porcelain`` is empty (untracked files count)."""
    dirty = git(["status", "--porcelain"], cwd=cwd).strip()
    if dirty:
        raise BuildError("refusing to build from a dirty git tree; commit or remove:\n" + dirty)


def commit_tag(*, cwd: Path = REPO_ROOT) -> str:
    return git(["rev-parse", "--short=12", "HEAD"], cwd=cwd).strip()


@dataclass(frozen=True)
class BuildPlan:
    region: str
    account: str
    repository: str
    tag: str
    base_account: str

    @property
    def registry(self) -> str:
        return f"{self.account}.dkr.ecr.{self.region}.{ecr_domain(self.region)}"

    @property
    def base_registry(self) -> str:
        return f"{self.base_account}.dkr.ecr.{self.region}.{ecr_domain(self.region)}"

    @property
    def image_uri(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"

    def login_commands(self) -> list[list[str]]:
        """``docker login`` to the DLC registry (to pull the base) and to ours (to push)."""
        return [
            ["docker", "login", "--username", "AWS", "--password-stdin", registry]
            for registry in (self.base_registry, self.registry)
        ]

    def build_command(self) -> list[str]:
        # buildx with --provenance=false: a single-platform image manifest, which SageMaker
        # accepts (an attestation index is refused).
        return [
            "docker", "buildx", "build",
            "--platform", "linux/amd64",
            "--provenance=false",
            "--build-arg", f"REGION={self.region}",
            "--build-arg", f"BASE_ACCOUNT={self.base_account}",
            "-f", DOCKERFILE,
            "-t", self.image_uri,
            "--push",
            ".",
        ]


def plan_build(*, region: str, account: str, repository: str, tag: str) -> BuildPlan:
    return BuildPlan(region=region, account=account, repository=repository, tag=tag,
                     base_account=dlc_registry_account(region=region))


def _run(cmd: Sequence[str], *, stdin: str | None = None) -> str:
    return subprocess.run(list(cmd), cwd=REPO_ROOT, check=True, input=stdin, text=True,
                          stdout=subprocess.PIPE).stdout


def build_and_push(*, plan: BuildPlan, session, log: Callable[[str], None]) -> str:
    """Run the plan with a boto3 session; return the image URI (idempotent per commit)."""
    ecr = session.client("ecr", region_name=plan.region)
    try:
        ecr.describe_images(repositoryName=plan.repository, imageIds=[{"imageTag": plan.tag}])
        log(f"{plan.image_uri} exists already (tags are immutable): nothing to build")
        return plan.image_uri
    except ecr.exceptions.ImageNotFoundException:
        pass
    import base64

    token = ecr.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    password = base64.b64decode(token).decode().split(":", 1)[1]
    for cmd in plan.login_commands():
        log("$ " + shlex.join(cmd))
        _run(cmd, stdin=password)
    log("$ " + shlex.join(plan.build_command()))
    subprocess.run(plan.build_command(), cwd=REPO_ROOT, check=True)
    return plan.image_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--region", required=True)
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY, help="ECR repository name (stack output ImageRepositoryName)")
    parser.add_argument("--account", help="account of the ECR repository; default: the caller's (sts)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        ensure_clean_tree()
        tag = commit_tag()
        session = None
        account = args.account
        if account is None:
            import boto3

            session = boto3.Session(region_name=args.region)
            account = session.client("sts").get_caller_identity()["Account"]
        plan = plan_build(region=args.region, account=account, repository=args.repository, tag=tag)
        if args.dry_run:
            for cmd in plan.login_commands():
                log(f"$ aws ecr get-login-password --region {plan.region} | " + shlex.join(cmd))
            log("$ " + shlex.join(plan.build_command()))
            print(plan.image_uri)
            return 0
        if session is None:
            import boto3

            session = boto3.Session(region_name=args.region)
        print(build_and_push(plan=plan, session=session, log=log))
        return 0
    except (BuildError, subprocess.CalledProcessError) as exc:
        log(f"build_and_push_image: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
