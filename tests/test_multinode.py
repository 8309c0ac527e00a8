"""Two nodes in two network namespaces joined by a veth pair, each with its own address and
hostname, neither address in any hosts file, each hostname resolving to 127.0.1.1 (Ubuntu's
hosts file): the network a user's two machines give, not loopback. Needs root and `ip netns`;
skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dist_train.errors import EXIT_INFRA

from conftest import CLI, REPO, TESTS, cli, leftover_processes
from helpers import TINY_GPT, torch_log_lines

RUN = [
    "configs/quickstart.yaml",
    *TINY_GPT,
    "model.dropout=0.0",
    "log.every_steps=2",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "train.global_batch_size=8",
]
SUBNET = "10.213.{}.{}"


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    probe = f"dtprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


REASON = why_not()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@dataclass
class Lab:
    names: tuple[str, str]  # namespaces
    links: tuple[str, str]  # veth ends
    addrs: tuple[str, str]

    def start(self, node: int, *args: str) -> subprocess.Popen[str]:
        """`dist-train ARGS` on a node: its namespace, its own hostname (a fresh UTS
        namespace), and `ip netns exec`'s per-namespace /etc/hosts."""
        # The checkout under test first, as conftest's `cli` does: an editable install of
        # another checkout must not answer for `dist_train` on the nodes.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
            env.pop(var, None)
        host = f"trainer-{node}"
        return subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.names[node],
                "unshare",
                "--uts",
                "--",
                "sh",
                "-c",
                'hostname "$0" && exec "$@"',
                host,
                str(CLI),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )

    def cut(self) -> None:
        sh("ip", "-n", self.names[0], "link", "set", self.links[0], "down")


@pytest.fixture
def lab() -> Iterator[Lab]:
    tag = os.getpid() % 100000
    names = (f"dt{tag}n0", f"dt{tag}n1")
    links = (f"dt{tag}v0", f"dt{tag}v1")
    net = tag % 250 + 1
    addrs = (SUBNET.format(net, 1), SUBNET.format(net, 2))
    try:
        for node, name in enumerate(names):
            sh("ip", "netns", "add", name)
            etc = Path("/etc/netns") / name
            etc.mkdir(parents=True, exist_ok=True)
            # What Ubuntu writes: the machine's own name on a loopback address.
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 trainer-{node}\n")
        sh(
            "ip",
            "link",
            "add",
            links[0],
            "netns",
            names[0],
            "type",
            "veth",
            "peer",
            "name",
            links[1],
            "netns",
            names[1],
        )
        for node in (0, 1):
            sh("ip", "-n", names[node], "addr", "add", f"{addrs[node]}/24", "dev", links[node])
            sh("ip", "-n", names[node], "link", "set", "lo", "up")
            sh("ip", "-n", names[node], "link", "set", links[node], "up")
        yield Lab(names, links, addrs)
    finally:
        for name in names:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            for pid in pids.stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def node_args(lab: Lab, node: int, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        *RUN,
        "--nnodes",
        "2",
        "--node-rank",
        str(node),
        "--rdzv-endpoint",
        f"{lab.addrs[0]}:29611",
        "--rdzv-timeout",
        "120",
        f"train.run_dir={run_dir}",
        *extra,
    ]


def test_two_nodes_train_like_one_node_with_two_workers(lab: Lab, tmp_path: Path) -> None:
    run_dir = tmp_path / "two_nodes"
    # node 1 first: it must wait for node 0 instead of taking rank 0
    node1 = lab.start(1, *node_args(lab, 1, run_dir, "train.max_steps=12"))
    time.sleep(2)
    node0 = lab.start(0, *node_args(lab, 0, run_dir, "train.max_steps=12"))
    out0, err0 = node0.communicate(timeout=300)
    out1, err1 = node1.communicate(timeout=60)
    assert node0.returncode == 0, err0[-3000:]
    assert node1.returncode == 0, err1[-3000:]
    for node, out in ((0, out0), (1, out1)):
        assert f"dist-train: node {node} of 2 ({lab.addrs[node]}; GLOO_SOCKET_IFNAME=" in out
    assert "step 12 loss" in out0 and "step 12 loss" not in out1  # rank 0 is on node 0
    one = cli("train", *RUN, "--nproc", "2", "train.max_steps=12", f"train.run_dir={tmp_path}/one")
    assert one.returncode == 0, one.stderr[-3000:]
    assert losses(run_dir) == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    assert leftover_processes(str(run_dir)) == []


def test_a_cut_link_ends_both_nodes_within_the_timeout(lab: Lab, tmp_path: Path) -> None:
    run_dir = tmp_path / "cut"
    extra = ("train.max_steps=100000", "parallel.timeout_s=5")
    nodes = [lab.start(n, *node_args(lab, n, run_dir, *extra)) for n in (0, 1)]
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir)) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in nodes)
            time.sleep(0.2)
        lab.cut()
        cut = time.monotonic()
        ended = {}
        while len(ended) < 2 and time.monotonic() - cut < 120:
            for n, proc in enumerate(nodes):
                if n not in ended and proc.poll() is not None:
                    ended[n] = time.monotonic() - cut
            time.sleep(0.1)
        # Printed, not asserted (machines are shared): measured 7.6 and 8.1 s on an idle one.
        print(f"link cut: exits after {ended} s (parallel.timeout_s=5; the aim: within 10 s)")
        assert sorted(ended) == [0, 1], f"still running: {set(range(2)) - set(ended)}"
        assert max(ended.values()) < 5 + 30  # the timeout plus a margin
        for n, proc in enumerate(nodes):
            _, err = proc.communicate(timeout=10)
            assert proc.returncode == EXIT_INFRA, err[-3000:]  # retryable, on both nodes
            assert "Traceback" not in err, err[-3000:]
            assert "frame #" not in err and "[c10d]" not in err, err[-3000:]
            assert torch_log_lines(err) == [], err[-3000:]
            said = [line for line in err.splitlines() if line.startswith("error: ")]
            assert said, err[-3000:]
            print(f"node {n} (exit {proc.returncode}):", *said, sep="\n  ")
    finally:
        for proc in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
