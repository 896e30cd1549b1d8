"""N mixtral-server replicas and vllm-router in front of them, all on 127.0.0.1.

    python deploy/replicas.py --replicas 2 --port 8000 -- --model demo

Everything after `--` goes to each `mixtral-server` (`python -m server`); the API key comes from
there or from `MIXTRAL_API_KEY`, as for one server. Clients talk to the router on `--port` with
the same key: the router passes the `Authorization` header through and the replicas check it.

The replicas listen on the ports after the router's (`--replica-port`, or free ones with 0), each
with its log in `--log-dir`. The router (vllm-router, pinned in pyproject.toml) health-checks
each replica's `/ready` (not `/health`: a draining replica stays live but is not ready) every
`--health-interval-s` and takes one out after two failed checks. The replicas run with
`open_metrics`, since the router polls `/get_load` without a key.

Once every replica is ready and the router sees them all, one line names the router and the
replicas (and `--status-file` gets the same as JSON, for scripts). SIGTERM or Ctrl-C drains the
replicas first (the router keeps carrying their in-flight streams), then stops the router. A
replica that dies is logged and left out by the router; when none is left, or the router dies,
everything stops and the exit status is 1. The children get SIGTERM if this process dies.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")
HEALTH_FAILURES = 2  # failed `/ready` checks before the router takes a replica out
# A replica's drain (server/settings.py drain_timeout_s, 30 s) plus its flush and close.
STOP_GRACE_S = 45.0


@dataclass
class Process:
    name: str
    url: str
    pid: int
    log: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops them in order
        )


def get_json(url: str, timeout: float = 2.0) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError):
        return 0, None


def router_command(args: argparse.Namespace, urls: list[str], metrics_port: int) -> list[str]:
    router = shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or "vllm-router"
    return [
        router, "--host", args.host, "--port", str(args.port), "--worker-urls", *urls,
        "--policy", args.policy,
        "--health-check-endpoint", "/ready",
        "--health-check-interval-secs", str(args.health_interval_s),
        "--health-failure-threshold", str(HEALTH_FAILURES),
        "--health-success-threshold", "1",
        "--worker-startup-timeout-secs", str(int(args.startup_timeout_s)),
        "--worker-startup-check-interval", "1",
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        "--log-level", "warning",
    ]  # fmt: skip


class Cluster:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="mixtral-replicas-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.replicas: list[tuple[Process, subprocess.Popen]] = []
        self.router: tuple[Process, subprocess.Popen] | None = None
        self.stopping = False

    def replica_ports(self) -> list[int]:
        if self.args.replica_port == 0:
            return [free_port() for _ in range(self.args.replicas)]
        first = self.args.replica_port or self.args.port + 1
        return list(range(first, first + self.args.replicas))

    def start_replicas(self) -> None:
        env = os.environ | {"MIXTRAL_OPEN_METRICS": "true", "PYTHONUNBUFFERED": "1"}
        for i, port in enumerate(self.replica_ports()):
            log = self.log_dir / f"replica-{i}.log"
            cmd = [sys.executable, "-m", "server", *self.args.server_args, "--host", "127.0.0.1"]
            proc = spawn([*cmd, "--port", str(port)], log, env)
            self.replicas.append(
                (Process(f"replica-{i}", f"http://127.0.0.1:{port}", proc.pid, str(log)), proc)
            )

    def wait_ready(self) -> None:
        """Until every replica's /ready is 200, with a progress line; raises if one exits."""
        start = time.monotonic()
        pending = {p.name for p, _ in self.replicas}
        while pending:
            if self.stopping:
                raise RuntimeError("stopped while the replicas loaded")
            for p, proc in self.replicas:
                if p.name not in pending:
                    continue
                if proc.poll() is not None:
                    tail = Path(p.log).read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{p.name} exited with {proc.returncode} while loading:\n{tail}")
                if get_json(f"{p.url}/ready")[0] == 200:
                    pending.discard(p.name)
                    log(f"{p.name} ready at {p.url} after {time.monotonic() - start:.0f} s")
            elapsed = time.monotonic() - start
            if elapsed > self.args.startup_timeout_s:
                raise RuntimeError(f"{', '.join(sorted(pending))} not ready after {elapsed:.0f} s")
            if pending:
                time.sleep(0.25)

    def start_router(self) -> None:
        urls = [p.url for p, _ in self.replicas]
        log_path = self.log_dir / "router.log"
        proc = spawn(router_command(self.args, urls, free_port()), log_path)
        url = f"http://{self.args.host}:{self.args.port}"
        self.router = (Process("router", url, proc.pid, str(log_path)), proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the router exited with {proc.returncode}:\n{tail}")
            status, body = get_json(f"{url}/readiness")
            if self.stopping:
                raise RuntimeError("stopped while the router started")
            if status == 200 and isinstance(body, dict) and body.get("healthy_workers") == len(urls):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the router did not see {len(urls)} healthy replicas within 60 s")

    def status(self) -> dict[str, object]:
        assert self.router is not None
        return {
            "router": asdict(self.router[0]),
            "policy": self.args.policy,
            "replicas": [asdict(p) for p, _ in self.replicas],
            "log_dir": str(self.log_dir),
        }

    def supervise(self) -> int:
        """Until a signal, or until the router or the last replica dies; the exit status."""
        assert self.router is not None
        reported: set[str] = set()
        while not self.stopping:
            if self.router[1].poll() is not None:
                log(f"the router exited with {self.router[1].returncode}; stopping the replicas")
                return 1
            for p, proc in self.replicas:
                if proc.poll() is not None and p.name not in reported:
                    reported.add(p.name)
                    log(
                        f"{p.name} exited with {proc.returncode} (its log: {p.log}); the router leaves it out"
                    )
            if len(reported) == len(self.replicas):
                log("no replica is left; stopping the router")
                return 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        """Drain the replicas (SIGTERM; the router still carries their streams), then the router."""
        for _, proc in self.replicas:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p, proc in self.replicas:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{p.name} did not stop within {STOP_GRACE_S:g} s; killing it")
                proc.kill()
                proc.wait()
        if self.router is not None and self.router[1].poll() is None:
            self.router[1].terminate()
            try:
                self.router[1].wait(10)
            except subprocess.TimeoutExpired:
                self.router[1].kill()
                self.router[1].wait()


def log(message: str) -> None:
    print(f"replicas: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2, help="mixtral-server processes (default: 2)")
    p.add_argument("--host", default="127.0.0.1", help="the router's bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the router's port (default: 8000)")
    p.add_argument(
        "--replica-port",
        type=int,
        default=None,
        help="first replica's port (default: --port + 1; 0: free ports)",
    )
    p.add_argument(
        "--policy", choices=POLICIES, default="cache_aware", help="routing policy (default: cache_aware)"
    )
    p.add_argument(
        "--health-interval-s", type=int, default=5, help="seconds between /ready checks (default: 5)"
    )
    p.add_argument(
        "--startup-timeout-s", type=float, default=900, help="for the replicas to load (default: 900)"
    )
    p.add_argument("--log-dir", help="the replicas' and router's logs (default: a new temporary directory)")
    p.add_argument("--status-file", type=Path, help="where to write the ready status as JSON")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="-- then mixtral-server's arguments")
    args = p.parse_args(argv)
    args.server_args = [a for a in args.server_args[:1] if a != "--"] + args.server_args[1:]
    if args.replicas < 1:
        p.error("--replicas must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = Cluster(args)

    def on_signal(signum: int, frame: object) -> None:
        cluster.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 1
    try:
        cluster.start_replicas()
        log(f"{args.replicas} replicas loading; logs in {cluster.log_dir}")
        cluster.wait_ready()
        cluster.start_router()
        status = cluster.status()
        if args.status_file:
            args.status_file.write_text(json.dumps(status, indent=2))
        names = ", ".join(f"{p.url} (pid {p.pid})" for p, _ in cluster.replicas)
        assert cluster.router is not None
        log(f"router ready at {cluster.router[0].url} (policy {args.policy}) over {names}")
        code = cluster.supervise()
    except RuntimeError as e:
        log(str(e))
    finally:
        cluster.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
