"""The deploy recipes, checked by schema-aware tools: Kubernetes (kubernetes-validate),
AWS Batch (botocore's service model), GitHub Actions (check-jsonschema's vendored
workflow schema), Slurm (bash -n); and each against what pulse-batch expects."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from batch.manifest import parse_manifest
from batch.shard import Shard, from_environment
from tests.needs import need_module

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _k8s_documents() -> list[dict[str, Any]]:
    text = (DEPLOY / "kubernetes" / "indexed-job.yaml").read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.parametrize("version", ["1.37.0", "1.30.0"])
def test_kubernetes_yaml_is_valid_for_the_api(version: str) -> None:
    documents = _k8s_documents()
    assert [d["kind"] for d in documents] == ["ConfigMap", "Job"]
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)  # raises if invalid


def test_kubernetes_yaml_shards_the_job_as_pulse_batch_expects() -> None:
    config_map, job = _k8s_documents()
    spec = job["spec"]
    args = spec["template"]["spec"]["containers"][0]["args"]
    shards = int(args[args.index("--shards") + 1])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == shards
    manifest = parse_manifest(yaml.safe_load(config_map["data"]["job.yaml"]), Path("job.yaml"))
    # Each pod opens its share; the shares add up to the job's concurrency.
    shares = [Shard(i, shards).concurrency(manifest.run.concurrency) for i in range(shards)]
    assert sum(shares) == manifest.run.concurrency
    for index in range(shards):  # what Kubernetes sets, as the runner reads it
        shard = from_environment({"JOB_COMPLETION_INDEX": str(index)}, None, shards)
        assert shard is not None and (shard.index, shard.count) == (index, shards)
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _dockerfile_uid()
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    key_env = manifest.pulse.api_key_env
    assert env[key_env]["valueFrom"]["secretKeyRef"]["name"] == "pulse-batch"
    assert "value" not in env[key_env]  # the key only ever comes from the Secret
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert args[1].rsplit("/", 1)[0] in mounts  # the manifest is the ConfigMap's file
    assert manifest.output.path.startswith("s3://") and manifest.output.format == "delta"


def _dockerfile_uid() -> int:
    text = (ROOT / "Dockerfile").read_text()
    user = re.findall(r"^USER (\d+)", text, flags=re.MULTILINE)
    assert len(user) == 1 and int(user[0]) != 0, "the image runs as a numeric non-root user"
    return int(user[0])


def test_dockerfile_installs_the_runner_with_its_extras_and_no_recognizer() -> None:
    text = (ROOT / "Dockerfile").read_text()
    extras = re.search(r"^ARG EXTRAS=(\S*)$", text, flags=re.MULTILINE)
    assert extras is not None
    wanted = set(extras.group(1).split(","))
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert wanted <= set(declared), f"{wanted - set(declared)} are not extras of pyproject.toml"
    assert "recognizer" not in wanted and "dev" not in wanted
    assert {"s3", "delta"} <= wanted  # what an output on object storage needs
    assert re.search(r'^ENTRYPOINT \["pulse-batch"\]$', text, flags=re.MULTILINE)
    _dockerfile_uid()


def test_aws_batch_job_definition_matches_the_batch_api() -> None:
    botocore_session = need_module("botocore.session", "boto3 is in the dev extra: run `make test`")
    from botocore.validate import ParamValidator

    definition = json.loads((DEPLOY / "aws-batch" / "job-definition.json").read_text())
    model = botocore_session.get_session().get_service_model("batch")
    shape = model.operation_model("RegisterJobDefinition").input_shape
    report = ParamValidator().validate(definition, shape)
    assert not report.has_errors(), report.generate_report()
    no_retry = {
        rule["onExitCode"]
        for rule in definition["retryStrategy"]["evaluateOnExit"]
        if rule["action"] == "EXIT"
    }
    assert no_retry == {"2", "3"}
    env = {"AWS_BATCH_JOB_ARRAY_INDEX": "3", "AWS_BATCH_JOB_ARRAY_SIZE": "4"}
    assert from_environment(env) == Shard(3, 4, "AWS_BATCH_JOB_ARRAY_INDEX")


def test_github_actions_workflow_matches_the_workflow_schema() -> None:
    path = DEPLOY / "github-actions" / "transcribe.yml"
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    workflow = yaml.safe_load(path.read_text())
    legs = workflow["jobs"]["shard"]["strategy"]["matrix"]["shard"]
    assert legs == list(range(int(workflow["env"]["SHARDS"])))
    run_step = next(s for s in workflow["jobs"]["shard"]["steps"] if "--shard" in s.get("run", ""))
    assert '--shard "${{ matrix.shard }}/${SHARDS}"' in run_step["run"]
    final = workflow["jobs"]["done"]
    assert final["needs"] == "shard"
    assert any("pulse-batch status" in s.get("run", "") for s in final["steps"])


def test_slurm_script_parses_and_its_array_maps_to_shards() -> None:
    path = DEPLOY / "slurm" / "pulse-batch.sbatch"
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    array = re.search(r"^#SBATCH --array=(\d+)-(\d+)", path.read_text(), flags=re.MULTILINE)
    assert array is not None
    first, last = int(array.group(1)), int(array.group(2))
    count = last - first + 1
    for task in range(first, last + 1):  # what Slurm sets for each task of that array
        env = {
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_COUNT": str(count),
            "SLURM_ARRAY_TASK_MIN": str(first),
            "SLURM_ARRAY_TASK_STEP": "1",
        }
        shard = from_environment(env)
        assert shard is not None and (shard.index, shard.count) == (task - first, count)
    assert path.read_text().rstrip().endswith('exec pulse-batch run "$manifest"')
