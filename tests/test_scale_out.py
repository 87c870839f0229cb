"""One migration split over a cluster's tasks (issue 18): ``--shard auto`` reads the
shard from the scheduler that started the process, N shards running at once into one
destination give what one clean migration gives, and the examples in docs/scale-out/
are parsed and run as their schedulers would run them."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.entities import ViewType
from trackbridge.errors import UsageError
from trackbridge.sync_config import shard_from_scheduler
from trackbridge.trackers.mlflow import common as mc

from tests.conftest import one_line, run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "scale-out"


@pytest.mark.parametrize(
    ("env", "shard"),
    [
        ({"TRACKBRIDGE_SHARD": "2/8"}, (2, 8)),
        ({"JOB_COMPLETION_INDEX": "0", "TRACKBRIDGE_SHARD_COUNT": "3"}, (1, 3)),
        ({"JOB_COMPLETION_INDEX": "2", "TRACKBRIDGE_SHARD_COUNT": "3"}, (3, 3)),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, (1, 4)),
        ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (8, 8)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "9",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "3",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            (4, 4),
        ),
        ({"TRACKBRIDGE_SHARD": "1/2", "JOB_COMPLETION_INDEX": "0", "TRACKBRIDGE_SHARD_COUNT": "2"}, (1, 2)),
    ],
    ids=["plain", "k8s-first", "k8s-last", "slurm-0", "slurm-from-1", "slurm-step", "two-agree"],
)
def test_the_shard_comes_from_the_scheduler(env, shard):
    assert shard_from_scheduler(env) == shard


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "no scheduler's shard found"),
        ({"JOB_COMPLETION_INDEX": "1"}, "set it to the Job's spec.completions"),
        ({"JOB_COMPLETION_INDEX": "3", "TRACKBRIDGE_SHARD_COUNT": "3"}, "is not below"),
        (
            {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"},
            "evenly spaced",
        ),
        ({"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_COUNT is not set"),
        ({"TRACKBRIDGE_SHARD": "3/2"}, "expected K/N"),
        (
            {"TRACKBRIDGE_SHARD": "1/2", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"},
            "contradicts",
        ),
        ({"JOB_COMPLETION_INDEX": "x", "TRACKBRIDGE_SHARD_COUNT": "3"}, "not a whole number"),
    ],
    ids=[
        "nothing",
        "k8s-no-count",
        "k8s-index-too-big",
        "slurm-list",
        "slurm-no-count",
        "bad-k",
        "disagree",
        "junk",
    ],
)
def test_a_missing_or_contradictory_shard_is_refused(env, says):
    with pytest.raises(UsageError, match=says):
        shard_from_scheduler(env)


class _KubeApi:
    """A Kubernetes API server on 127.0.0.1, over TLS with its own CA, that knows one
    Job; and the service account a pod of that Job has mounted."""

    def __init__(self, root: Path, job: dict) -> None:
        import datetime
        import http.server
        import ipaddress
        import json
        import ssl
        import threading

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        def certificate(path: Path) -> tuple[Path, Path]:
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
            now = datetime.datetime.now(datetime.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(
                    x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
                )
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                .sign(key, hashes.SHA256())
            )
            path.mkdir(parents=True)
            (path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (path / "key.pem").write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            return path / "cert.pem", path / "key.pem"

        self.job, self.seen = job, []
        cert, key = certificate(root / "server")
        self.account = root / "serviceaccount"
        self.account.mkdir()
        (self.account / "token").write_text("s3cret-token\n")
        (self.account / "namespace").write_text("research")
        (self.account / "ca.crt").write_bytes(cert.read_bytes())
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.seen.append((self.path, self.headers.get("Authorization")))
                status, body = api.job.get(self.path, (404, {"kind": "Status"}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def env(self, index: int, hostname: str | None = None) -> dict[str, str]:
        return {
            "JOB_COMPLETION_INDEX": str(index),
            "HOSTNAME": hostname or f"trackbridge-migrate-{index}",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.server.server_address[1]),
        }

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


JOB = "/apis/batch/v1/namespaces/research/jobs/trackbridge-migrate"


@pytest.fixture
def kube(tmp_path: Path):
    api = _KubeApi(tmp_path, {JOB: (200, {"spec": {"completionMode": "Indexed", "completions": 8}})})
    yield api
    api.stop()


def test_an_indexed_jobs_count_is_read_from_the_job(kube):
    assert shard_from_scheduler(kube.env(2), k8s_account=kube.account) == (3, 8)
    assert kube.seen == [(JOB, "Bearer s3cret-token")]


@pytest.mark.parametrize(
    ("job", "hostname", "says"),
    [
        ((403, {"kind": "Status"}), None, "403, the pod's service account may not get jobs.batch"),
        ((200, {"spec": {"completions": 8}}), None, "is not an Indexed Job"),
        (
            (200, {"spec": {"completionMode": "Indexed", "completions": 2}}),
            None,
            "is not below the shard count, 2",
        ),
        ((200, []), None, "is not an Indexed Job"),
        (None, "worker-7", "hostname 'worker-7' is not <job name>-2"),
        (None, None, "404, no such Job"),
    ],
    ids=["forbidden", "not-indexed", "index-too-big", "junk", "other-hostname", "no-job"],
)
def test_a_job_that_cannot_say_its_count_is_one_line(kube, job, hostname, says):
    kube.job = {JOB: job} if job else {}
    with pytest.raises(UsageError, match=re.escape(says)) as e:
        shard_from_scheduler(kube.env(2, hostname), k8s_account=kube.account)
    assert "s3cret" not in str(e.value)
    assert "\n" not in str(e.value)


def test_the_kubernetes_api_is_only_believed_with_the_pods_own_ca(kube, tmp_path):
    """A server the service account's CA did not sign is refused, not believed."""
    other = _KubeApi(tmp_path / "other", kube.job)
    try:
        with pytest.raises(UsageError, match="CERTIFICATE_VERIFY_FAILED"):
            shard_from_scheduler(other.env(2), k8s_account=kube.account)
        assert other.seen == []
    finally:
        other.stop()


def test_shard_auto_without_a_scheduler_is_one_line_exit_2(demo_store, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "JOB_COMPLETION", "TRACKBRIDGE_SHARD"))
    }
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "trackbridge.cli",
            "sync",
            demo_store["tb"],
            f"mlflow+sqlite:///{tmp_path / 'd.db'}",
            "--shard",
            "auto",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "--shard auto: no scheduler's shard found" in one_line(p.stderr)
    assert not (tmp_path / "d.db").exists()  # refused before anything was read or written


def _shard_envs() -> list[dict[str, str]]:
    """Three shards, each told as a different scheduler tells it."""
    return [
        {"JOB_COMPLETION_INDEX": "0", "TRACKBRIDGE_SHARD_COUNT": "3"},
        {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"},
        {"TRACKBRIDGE_SHARD": "3/3"},
    ]


def _together(commands: list[tuple[list[str], dict[str, str]]], cwd: Path | None = None) -> None:
    """Start every command at once, then wait for all: each must succeed."""
    procs = []
    for argv, extra in commands:
        out = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION"))}
        procs.append(
            (subprocess.Popen(argv, env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT, cwd=cwd), out)
        )
    for p, out in procs:
        p.wait(timeout=900)
        out.seek(0)
        text = out.read()
        out.close()
        assert p.returncode == 0, f"{p.args}: exit {p.returncode}\n{text[-3000:]}"
        assert "Traceback" not in text, text


def _each_run_once(tracking_uri: str, expected: int) -> None:
    client = mlflow.MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(exps, run_view_type=ViewType.ALL, max_results=5000)
    ours = [r for r in runs if mc.TAG_SOURCE_KEY in r.data.tags]
    keys = [r.data.tags[mc.TAG_SOURCE_KEY] for r in ours]
    assert len(keys) == expected and len(set(keys)) == expected, sorted(keys)
    assert not [r for r in ours if mc.TAG_DUPLICATE_OF in r.data.tags]  # nothing made twice
    assert all("fingerprint" in mc.run_state(r.data.tags) for r in ours)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "server"])
def test_three_shards_at_once_give_one_clean_migration(kind, demo_store, tmp_path, request):
    """Three `sync --shard auto` processes started together into one new destination:
    every run once, none made twice, `verify` identical against the whole source."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'dest.db'}"
    elif kind == "postgresql":
        url = request.getfixturevalue("postgres").create_database(f"shards{os.getpid()}")
    else:
        from trackbridge.trackers.mlflow.server import LocalMlflowServer

        server = LocalMlflowServer(tmp_path / "server", workers=2)
        url = server.start()
        request.addfinalizer(server.stop)
    dest = f"mlflow+{url}"
    extra = ["--artifact-root", str(tmp_path / "files")] if kind == "postgresql" else []
    _together(
        [
            (
                [
                    sys.executable,
                    "-m",
                    "trackbridge.cli",
                    "sync",
                    demo_store["tb"],
                    dest,
                    "--shard",
                    "auto",
                    "--state-dir",
                    str(tmp_path / f"state{i}"),
                    *extra,
                ],
                env,
            )
            for i, env in enumerate(_shard_envs())
        ]
    )
    _each_run_once(url, 6)
    assert "verify: identical" in run_cli("verify", demo_store["tb"], dest).stdout


# --------------------------------------------------------------------------- the examples


def test_the_kubernetes_indexed_job_runs_its_pods_shards(demo_store, tmp_path):
    """The manifest is an Indexed Job whose count is its completions; its container's
    command, run as Kubernetes would run each pod (JOB_COMPLETION_INDEX 0..N-1, its
    env, ``$(VAR)`` expanded), migrates every run once."""
    job = yaml.safe_load((EXAMPLES / "kubernetes-indexed-job.yaml").read_text())
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["TRACKBRIDGE_SHARD_COUNT"]) == spec["completions"]
    assert "--shard" in container["command"] and "auto" in container["command"]
    url = f"sqlite:///{tmp_path / 'dest.db'}"
    env.update(SRC=demo_store["tb"], DEST=f"mlflow+{url}")

    def expand(arg: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)

    pods = []
    for index in range(spec["completions"]):
        argv = [expand(a) for a in container["command"]]
        argv[argv.index("--state-dir") + 1] = str(tmp_path / f"pod{index}")
        assert argv[0] == "trackbridge"
        pods.append(
            (
                [sys.executable, "-m", "trackbridge.cli", *argv[1:]],
                {
                    "JOB_COMPLETION_INDEX": str(index),
                    "TRACKBRIDGE_SHARD_COUNT": env["TRACKBRIDGE_SHARD_COUNT"],
                },
            )
        )
    _together(pods)
    _each_run_once(url, 6)
    assert "verify: identical" in run_cli("verify", demo_store["tb"], f"mlflow+{url}").stdout


def test_the_rbac_example_lets_the_pods_read_their_job_and_nothing_more():
    docs = list(yaml.safe_load_all((EXAMPLES / "kubernetes-job-rbac.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert sorted(kinds) == ["Role", "RoleBinding", "ServiceAccount"]
    assert kinds["Role"]["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]}]
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": kinds["ServiceAccount"]["metadata"]["name"]}
    ]


def test_the_slurm_array_script_runs_its_tasks_shards(demo_store, tmp_path):
    """The script, run by bash as sbatch would run each array task (its #SBATCH
    --array range, SLURM_ARRAY_TASK_* set), migrates every run once."""
    script = EXAMPLES / "slurm-array.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    low, high = map(int, re.search(r"^#SBATCH --array=(\d+)-(\d+)$", script.read_text(), re.M).groups())
    url = f"sqlite:///{tmp_path / 'dest.db'}"
    bin_dir = _bin(tmp_path)
    tasks = [
        (
            ["bash", str(script)],
            {
                "SLURM_ARRAY_TASK_ID": str(t),
                "SLURM_ARRAY_TASK_COUNT": str(high - low + 1),
                "SLURM_ARRAY_TASK_MIN": str(low),
                "SLURM_ARRAY_TASK_MAX": str(high),
                "SRC": demo_store["tb"],
                "DEST": f"mlflow+{url}",
                "TRACKBRIDGE_STATE_DIR": str(tmp_path / f"task{t}"),
                "PATH": f"{bin_dir}:{os.environ['PATH']}",
            },
        )
        for t in range(low, high + 1)
    ]
    _together(tasks)
    _each_run_once(url, 6)
    assert "verify: identical" in run_cli("verify", demo_store["tb"], f"mlflow+{url}").stdout


def test_the_airflow_dag_maps_one_task_per_shard(demo_store, tmp_path):
    """The DAG (Airflow itself is not installed here: read as Python's parser reads it)
    maps one BashOperator task per shard with ``.partial().expand()``; its command, run
    with each mapped task's env, migrates every run once."""
    tree = ast.parse((EXAMPLES / "airflow_dag.py").read_text())
    consts = {
        t.targets[0].id: ast.literal_eval(t.value)
        for t in tree.body
        if isinstance(t, ast.Assign)
        and isinstance(t.targets[0], ast.Name)
        and isinstance(t.value, ast.Constant)
    }
    calls = {
        n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    assert {"partial", "expand"} <= calls
    assert "--shard auto" in consts["COMMAND"]
    url = f"sqlite:///{tmp_path / 'dest.db'}"
    shards = consts["SHARDS"]
    mapped = [
        (
            ["bash", "-c", consts["COMMAND"]],
            {
                "SRC": demo_store["tb"],
                "DEST": f"mlflow+{url}",
                "TRACKBRIDGE_SHARD": f"{k}/{shards}",
                "TRACKBRIDGE_STATE_DIR": str(tmp_path / f"task{k}"),
                "PATH": f"{_bin(tmp_path)}:{os.environ['PATH']}",
            },
        )
        for k in range(1, shards + 1)
    ]
    _together(mapped)
    _each_run_once(url, 6)


def _bin(tmp_path: Path) -> Path:
    """A folder with `trackbridge` in it, as an install puts it on PATH (this
    interpreter's, whatever PATH says)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    (d / "trackbridge").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m trackbridge.cli "$@"\n')
    (d / "trackbridge").chmod(0o755)
    return d
