"""How many pods the Kubernetes Indexed Job this process runs in has: ``--shard auto``
needs the count, and Kubernetes sets only the index (``JOB_COMPLETION_INDEX``) in a
pod's environment. The Job's ``spec.completions`` is read from the Kubernetes API with
the pod's own service account, as any in-cluster client reads it; the pod needs ``get``
on ``jobs`` in its namespace (a Role, docs/scale-out.md). One GET with the mounted token
and CA is all it takes, so no Kubernetes client library is needed for it.

An Indexed Job's pod is named by Kubernetes ``<job name>-<index>`` in its hostname,
which is how the Job is found. The token is never shown, in an error or anywhere else.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from trackbridge.errors import UsageError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_OR = "; or set TRACKBRIDGE_SHARD_COUNT to the Job's spec.completions"


def job_completions(env: Mapping[str, str], index: int, account: Path = SERVICE_ACCOUNT) -> int:
    """The ``spec.completions`` of the Indexed Job whose pod, of ``index``, this is."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port or not (account / "token").is_file():
        raise UsageError(
            "--shard auto: JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job), but not "
            "TRACKBRIDGE_SHARD_COUNT, and the Job cannot be read here (no KUBERNETES_SERVICE_HOST "
            f"or no service account token in {account}); set it to the Job's spec.completions "
            "in its pod template"
        )
    hostname, suffix = env.get("HOSTNAME", ""), f"-{index}"
    if not hostname.endswith(suffix) or hostname == suffix:
        raise UsageError(
            f"--shard auto: the pod's hostname {hostname!r} is not <job name>{suffix}, as "
            f"Kubernetes names an Indexed Job's pods, so its Job is unknown{_OR}"
        )
    job = hostname[: -len(suffix)]
    try:
        namespace = (account / "namespace").read_text().strip()
        token = (account / "token").read_text().strip()
        context = ssl.create_default_context(cafile=str(account / "ca.crt"))
    except (OSError, ssl.SSLError) as e:
        raise UsageError(
            f"--shard auto: cannot read the pod's service account in {account} ({e}){_OR}"
        ) from e
    where = f"https://{f'[{host}]' if ':' in host else host}:{port}"
    url = f"{where}/apis/batch/v1/namespaces/{quote(namespace, safe='')}/jobs/{quote(job, safe='')}"
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    what = f"Job {namespace}/{job}"
    try:
        with urllib.request.urlopen(request, context=context, timeout=15) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        why = {
            401: "the pod's service account token was refused",
            403: "the pod's service account may not get jobs.batch in its namespace (grant it a Role)",
            404: "no such Job in the pod's namespace",
        }.get(e.code, e.reason)
        raise UsageError(
            f"--shard auto: reading {what} from the Kubernetes API: HTTP {e.code}, {why}{_OR}"
        ) from e
    except (OSError, ValueError) as e:
        raise UsageError(
            f"--shard auto: cannot read {what} from the Kubernetes API at {where} ({e}){_OR}"
        ) from e
    spec = body.get("spec") if isinstance(body, dict) else None
    completions = spec.get("completions") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or spec.get("completionMode") != "Indexed" or type(completions) is not int:
        raise UsageError(f"--shard auto: {what} is not an Indexed Job with a completions count{_OR}")
    return completions
