"""launch/ recipes are thin: the local and multi-node scripts and the Kubernetes PyTorchJob call
`dist-train train` with the right flags, and the exit status reaches the operator unchanged
(SLURM: test_launch_slurm.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from conftest import REPO
from helpers_launch import INFRA, PREEMPTED, fake_bin, run


def test_local(tmp_path: Path) -> None:
    env = fake_bin(tmp_path)
    assert run(["launch/local.sh", "c.yaml", "4", "optim.lr=1"], env) == [
        "train",
        "c.yaml",
        "--nproc",
        "4",
        "optim.lr=1",
    ]
    assert run(["launch/local.sh", "c.yaml"], env) == ["train", "c.yaml", "--nproc", "1"]


def test_multinode(tmp_path: Path) -> None:
    env = {**fake_bin(tmp_path), "NNODES": "2", "NODE_RANK": "1", "RDZV": "h0:29400", "NPROC": "8"}
    assert run(["launch/multinode.sh", "c.yaml", "a=1"], env) == [
        "train",
        "c.yaml",
        "--nproc",
        "8",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-endpoint",
        "h0:29400",
        "--rdzv-id",
        "dist_train",
        "--rdzv-timeout",
        "600",
        "a=1",
    ]


# --- Kubernetes ----------------------------------------------------------------------------


def pytorchjob() -> dict[str, Any]:
    return yaml.safe_load((REPO / "launch/pytorchjob.yaml").read_text())


def test_pytorchjob_replicas_and_restarts() -> None:
    job = pytorchjob()
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert job["kind"] == "PyTorchJob"
    # WORLD_SIZE is the pod count only while nprocPerNode is unset (else pods * nprocPerNode)
    assert "nprocPerNode" not in job["spec"]
    assert "elasticPolicy" not in job["spec"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] >= 1
    for spec in replicas.values():
        assert spec["restartPolicy"] == "ExitCode"  # 143 is retryable: the pod is recreated
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    pod = replicas["Master"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60  # time to save after SIGTERM
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"  # the container the operator injects variables into
    assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]


# The Kubeflow training-operator's ExitCode policy as it is implemented (pkg/util/train/
# train_util.go, IsRetryableExitCode): these codes recreate the pod, every other one fails the
# job. Its API comment says "128-255: retryable"; the code retries only these.
OPERATOR_RETRYABLE = {130, 137, 138, 143}


def test_pytorchjob_restarts_on_our_retryable_statuses_only() -> None:
    from dist_train.errors import EXIT_BUG, EXIT_INFRA, EXIT_INPUT, EXIT_PREEMPTED, RETRYABLE

    replicas = pytorchjob()["spec"]["pytorchReplicaSpecs"]
    assert {spec["restartPolicy"] for spec in replicas.values()} == {"ExitCode"}
    assert set(RETRYABLE) == {EXIT_PREEMPTED, EXIT_INFRA}
    assert set(RETRYABLE) <= OPERATOR_RETRYABLE  # a lost peer or a preemption: pod recreated
    assert not {EXIT_INPUT, EXIT_BUG} & OPERATOR_RETRYABLE  # the input, a bug: job failed
    # ... and what a dead process of ours shows: 137 (SIGKILL: the OOM killer) is retried too
    assert 128 + 9 in OPERATOR_RETRYABLE
    head = (REPO / "launch/pytorchjob.yaml").read_text().split("apiVersion:")[0]
    assert "130, 137, 138 or 143" in " ".join(head.replace("#", " ").split())


def test_pytorchjob_run_dir_is_on_the_shared_volume() -> None:
    pod = pytorchjob()["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    (run_dir,) = [a for a in container["command"][-1].split() if a.startswith("train.run_dir=")]
    run_dir = run_dir.removeprefix("train.run_dir=")
    claims = {
        v["name"]: v["persistentVolumeClaim"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = [m for m in container["volumeMounts"] if m["name"] in claims]
    assert len(mounts) == 1
    assert run_dir.startswith(mounts[0]["mountPath"].rstrip("/") + "/")
    assert claims[mounts[0]["name"]]["claimName"]
    assert "ReadWriteMany" in (REPO / "launch/pytorchjob.yaml").read_text()


def test_pytorchjob_command(tmp_path: Path) -> None:
    pod = pytorchjob()["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"] + container.get("args", [])
    assert command[:2] == ["sh", "-c"]
    operator_env = {"MASTER_ADDR": "m", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2"}
    env = {**fake_bin(tmp_path), **operator_env}
    argv = run(command, env)
    assert (REPO / argv[1]).is_file()
    assert argv == [
        "train",
        "configs/gpt_char.yaml",
        "--nproc",
        "8",
        "--nnodes",
        "3",
        "--node-rank",
        "2",
        "--rdzv-endpoint",
        "m:23456",
        "--rdzv-id",
        "dist-train",
        "train.run_dir=/runs/gpt_char",
    ]
    # exec: dist-train is the container's PID 1, the process Kubernetes sends SIGTERM to
    assert command[2].lstrip().startswith("exec dist-train ")
    # the exit status reaches the operator unchanged (143, 138 -> pod recreated; 2, 1 -> job
    # failed)
    for status in (PREEMPTED, INFRA, 2, 1):
        proc = subprocess.run(
            command, env={**env, "DT_EXIT": str(status)}, capture_output=True, timeout=30
        )
        assert proc.returncode == status
