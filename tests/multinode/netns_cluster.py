"""A Ray cluster of real nodes with their own addresses, on one machine (root only).

Each node runs in its own network namespace with one interface, ``eth0``
(198.18.0.<2+i>/24), whose peer sits on a bridge that lives in a namespace
of its own (the "switch"): nothing is added to the host's network, no
route leads out, so traffic stays between these namespaces. The head runs
``ray start --head``, the others ``ray start --address`` (each with its own
``--temp-dir``, so no other Ray cluster on this machine is found or joined
by mistake, and a random auth token of its own passed by environment).

Commands that talk to the cluster (drivers, ``serve deploy``, HTTP clients)
run inside a node's namespace: ``cluster.run("head", [...])``.

The PID namespace is shared with the host, so ``ray stop`` would stop every
Ray process on the machine: a node is stopped by the pids of the processes
in its network namespace (found through /proc/<pid>/ns/net), which are
exactly its raylet, GCS, agents, workers and any command run there.

Teardown (``down``) kills those processes, deletes the namespaces (which
deletes the veths and the bridge with them) and the temp directory; it is
idempotent and also sweeps what a crashed run left (``sweep``).

Human use: ``scripts/netns-cluster up|down|status|sweep`` (see that file).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "adrmn"  # every namespace this module creates starts with it
SUBNET = "198.18.0"  # a benchmarking range (RFC 2544), used only inside our namespaces
GCS_PORT = 6379
DASHBOARD_PORT = 8265
# Node loss is noticed by GCS health checks: 1 s apart, 4 misses (~5 s, Ray's default ~30 s).
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 4,
                 "health_check_timeout_ms": 2000}
STATE_FILE = "cluster.json"
REPO = str(Path(__file__).resolve().parents[2])


@dataclass
class NodeSpec:
    """One Ray node: ``resources`` are its custom resources (e.g. {"adrenaline_prefill": 100})."""

    name: str
    num_cpus: float = 1
    resources: dict[str, float] = field(default_factory=dict)


def tool(name: str) -> str:
    """A console script of this interpreter's environment (``ray``, ``serve``)."""
    return str(Path(sys.executable).parent / name)


def _sh(*argv: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    if netns:
        argv = ("ip", "netns", "exec", netns, *argv)
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def available() -> str | None:
    """None when this machine can run such a cluster, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"{PREFIX}-probe{os.getpid()}"
    r = _sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` fails: {r.stderr.strip()}"
    _sh("ip", "netns", "del", probe, check=False)
    return None


def netns_inode(ns: str) -> int | None:
    try:
        return os.stat(f"/var/run/netns/{ns}").st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(ns: str) -> list[int]:
    """Every process whose network namespace is ``ns`` (and so every process of that node)."""
    inode = netns_inode(ns)
    if inode is None:
        return []
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}/ns/net").st_ino == inode:
                    out.append(int(d))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return out


def kill_netns_processes(ns: str, grace_s: float = 0.0) -> int:
    """SIGKILL (after SIGTERM and ``grace_s``, if given) every process in ``ns``; their count."""
    pids = pids_in_netns(ns)
    if grace_s > 0 and pids:
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and pids_in_netns(ns):
            time.sleep(0.1)
    for _ in range(50):  # a process may fork while we kill: repeat until none is left
        left = pids_in_netns(ns)
        if not left:
            break
        _signal(left, signal.SIGKILL)
        time.sleep(0.1)
    return len(pids)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class NetnsCluster:
    def __init__(self, nodes: list[NodeSpec], cluster_id: str | None = None,
                 root: str | None = None):
        if not nodes:
            raise ValueError("a cluster needs at least its head node")
        self.nodes = list(nodes)
        self.id = cluster_id or secrets.token_hex(2)
        self.root = Path(root or tempfile.mkdtemp(prefix=f"{PREFIX}{self.id}-", dir="/tmp"))
        self.token = secrets.token_hex(16)
        self.switch = f"{PREFIX}-{self.id}-sw"

    # -- names and addresses ------------------------------------------------------------
    def ns(self, node: str) -> str:
        return f"{PREFIX}-{self.id}-{node}"

    def ip(self, node: str) -> str:
        return f"{SUBNET}.{2 + self._index(node)}"

    @property
    def head(self) -> str:
        return self.nodes[0].name

    @property
    def address(self) -> str:
        """The GCS address nodes and drivers join (``ray.init(address=...)``)."""
        return f"{self.ip(self.head)}:{GCS_PORT}"

    @property
    def dashboard(self) -> str:
        """The dashboard (Serve REST API) address: ``serve deploy -a`` / ``serve status -a``."""
        return f"http://{self.ip(self.head)}:{DASHBOARD_PORT}"

    def _index(self, node: str) -> int:
        for i, n in enumerate(self.nodes):
            if n.name == node:
                return i
        raise KeyError(f"no node named {node!r}")

    def env(self) -> dict[str, str]:
        """Environment for every process of this cluster: its own token, no other cluster."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                   RAY_DEDUP_LOGS="1")
        # This checkout's code on every node (its workers import the app from it).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        return env

    # -- lifecycle ------------------------------------------------------------------------
    def up(self, timeout_s: float = 120.0) -> NetnsCluster:
        """Namespaces, links, then the Ray nodes (head first); waits until all have joined."""
        try:
            self._save()
            _sh("ip", "netns", "add", self.switch)
            _sh("ip", "link", "add", "br0", "type", "bridge", netns=self.switch)
            _sh("ip", "link", "set", "br0", "up", netns=self.switch)
            _sh("ip", "link", "set", "lo", "up", netns=self.switch)
            for i, node in enumerate(self.nodes):
                self._add_netns(node.name, i)
            for node in self.nodes:
                self.start_node(node.name)
            self.wait_nodes(len(self.nodes), timeout_s)
        except BaseException:
            self.down()
            raise
        return self

    def _add_netns(self, node: str, i: int) -> None:
        ns, port = self.ns(node), f"p{i}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            netns=self.switch)
        _sh("ip", "link", "set", port, "master", "br0", netns=self.switch)
        _sh("ip", "link", "set", port, "up", netns=self.switch)
        _sh("ip", "addr", "add", f"{self.ip(node)}/24", "dev", "eth0", netns=ns)
        _sh("ip", "link", "set", "eth0", "up", netns=ns)
        _sh("ip", "link", "set", "lo", "up", netns=ns)

    def add_node(self, spec: NodeSpec, timeout_s: float = 120.0) -> None:
        """A new node joins the running cluster."""
        self.nodes.append(spec)
        self._save()
        alive = len([n for n in self.alive_nodes() if n["Alive"]])
        self._add_netns(spec.name, len(self.nodes) - 1)
        self.start_node(spec.name)
        self.wait_nodes(alive + 1, timeout_s)

    def start_node(self, node: str) -> None:
        """``ray start`` the node in its namespace (again, after ``kill_node``)."""
        spec = self.nodes[self._index(node)]
        temp_dir = self.root / node
        shutil.rmtree(temp_dir, ignore_errors=True)  # a restarted node starts afresh
        temp_dir.mkdir(parents=True)
        argv = [tool("ray"), "start",
                f"--node-ip-address={self.ip(node)}", f"--temp-dir={temp_dir}",
                f"--num-cpus={spec.num_cpus}", "--num-gpus=0", "--disable-usage-stats",
                f"--resources={json.dumps(spec.resources)}"]
        if node == self.head:
            argv += ["--head", f"--port={GCS_PORT}", "--include-dashboard=true",
                     f"--dashboard-host={self.ip(node)}", f"--dashboard-port={DASHBOARD_PORT}",
                     f"--system-config={json.dumps(SYSTEM_CONFIG)}"]
        else:
            argv += [f"--address={self.address}"]
        r = self.run(node, argv, check=False, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"ray start on {node} failed:\n{r.stdout}\n{r.stderr}")

    def kill_node(self, node: str) -> int:
        """Node loss: SIGKILL its raylet and every process on it; the number killed."""
        return kill_netns_processes(self.ns(node))

    def down(self) -> None:
        """Stop every process of every node, delete the namespaces and the temp directory."""
        for node in self.nodes:
            ns = self.ns(node.name)
            kill_netns_processes(ns, grace_s=2.0)
            _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "netns", "del", self.switch, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- running things inside ------------------------------------------------------------
    def run(self, node: str, argv: list[str], *, check: bool = True, timeout: float = 300,
            **kw) -> subprocess.CompletedProcess:
        """``argv`` inside the node's namespace, from the repository root."""
        return subprocess.run(["ip", "netns", "exec", self.ns(node), *argv], env=self.env(),
                              cwd=REPO, check=check, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def popen(self, node: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns(node), *argv], env=self.env(),
                                cwd=REPO, **kw)

    def python(self, node: str, code: str, timeout: float = 300) -> str:
        """Run ``code`` with this interpreter inside ``node``'s namespace; its stdout."""
        r = self.run(node, [sys.executable, "-c", code], check=False, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"python on {node} failed ({r.returncode}):\n{r.stderr[-4000:]}")
        return r.stdout

    def driver(self, cmd: str, app: str, timeout: float = 300) -> dict:
        """A command of tests/multinode/driver.py, run on the head; its JSON answer."""
        r = self.run(self.head, [sys.executable, "-m", "tests.multinode.driver", cmd, app,
                                 self.address], check=False, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"driver {cmd} failed ({r.returncode}):\n{r.stderr[-4000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> list[dict]:
        """Ray's view of its nodes: NodeManagerAddress, Alive and Resources of each."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', "
                "log_to_driver=False); print(json.dumps([{k: n[k] for k in "
                "('NodeManagerAddress', 'Alive', 'Resources')} for n in ray.nodes()]))"
                % self.address)
        return json.loads(self.python(self.head, code).strip().splitlines()[-1])

    def wait_nodes(self, count: int, timeout_s: float = 120.0) -> None:
        """Until exactly ``count`` nodes are alive."""
        deadline = time.monotonic() + timeout_s
        while True:
            alive = [n for n in self.alive_nodes() if n["Alive"]]
            if len(alive) == count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} nodes alive, expected {count}")
            time.sleep(1.0)

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        state = {"id": self.id, "token": self.token,
                 "nodes": [{"name": n.name, "num_cpus": n.num_cpus, "resources": n.resources}
                           for n in self.nodes]}
        (self.root / STATE_FILE).write_text(json.dumps(state))

    @classmethod
    def load(cls, root: str) -> NetnsCluster:
        state = json.loads((Path(root) / STATE_FILE).read_text())
        c = cls([NodeSpec(**n) for n in state["nodes"]], cluster_id=state["id"], root=root)
        c.token = state["token"]
        return c


def sweep() -> list[str]:
    """Remove every namespace (and its processes) left by this module; their names."""
    r = _sh("ip", "netns", "list", check=False)
    names = [line.split()[0] for line in r.stdout.splitlines()
             if line.startswith(f"{PREFIX}-")]
    for ns in names:
        kill_netns_processes(ns, grace_s=1.0)
        _sh("ip", "netns", "del", ns, check=False)
    for d in Path("/tmp").glob(f"{PREFIX}*"):
        if (d / STATE_FILE).exists():
            shutil.rmtree(d, ignore_errors=True)
    return names


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="netns-cluster", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster; prints its directory (for `down`)")
    up.add_argument("nodes", nargs="*", default=["head", "prefill:adrenaline_prefill=100",
                                                  "decode:adrenaline_decode=100"],
                    help="name[:resource=amount,...]; the first is the head "
                         "(default: head prefill:adrenaline_prefill=100 decode:adrenaline_decode=100)")
    up.add_argument("--num-cpus", type=float, default=1)
    for name, help_ in (("down", "stop it and remove everything it made"),
                        ("status", "Ray's view of the nodes"),
                        ("env", "print the shell environment to talk to it (source it)")):
        sub.add_parser(name, help=help_).add_argument("dir")
    for name, help_ in (("kill-node", "SIGKILL every process of one node"),
                        ("start-node", "ray start one node again")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("dir")
        p.add_argument("node")
    sub.add_parser("sweep", help=f"remove every {PREFIX}-* namespace and its processes")
    a = ap.parse_args(argv)
    if a.cmd == "up":
        specs = []
        for item in a.nodes:
            name, _, res = item.partition(":")
            resources = {k: float(v) for k, v in (r.split("=") for r in res.split(",") if r)}
            specs.append(NodeSpec(name, a.num_cpus, resources))
        c = NetnsCluster(specs).up()
        print(c.root)
        for n in c.nodes:
            print(f"  {n.name}: {c.ip(n.name)} netns {c.ns(n.name)} {n.resources}")
        print(f"run inside: ip netns exec {c.ns(c.head)} <cmd>  (with `{sys.argv[0]} env {c.root}`)")
        print(f"dashboard / serve deploy -a {c.dashboard}")
    elif a.cmd == "sweep":
        print("\n".join(sweep()) or "nothing left")
    else:
        c = NetnsCluster.load(a.dir)
        if a.cmd == "down":
            c.down()
        elif a.cmd == "status":
            print(json.dumps(c.alive_nodes(), indent=1))
        elif a.cmd == "env":
            for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
                print(f"export {k}={c.env()[k]}")
            print(f"export RAY_ADDRESS={c.address}")
        elif a.cmd == "kill-node":
            print(c.kill_node(a.node), "processes killed")
        elif a.cmd == "start-node":
            c.start_node(a.node)


if __name__ == "__main__":
    main()
