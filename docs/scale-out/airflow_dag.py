"""A nightly sync split over 8 mapped tasks of one Airflow DAG (dynamic task mapping,
Airflow 2.3 or later). Each mapped task runs `trackbridge sync --shard auto` with its own
TRACKBRIDGE_SHARD=K/8; the shards share nothing but the destination, and a failed task
is retried alone. Credentials come from the worker's environment or an Airflow
connection exported to it, never from this file."""

from __future__ import annotations

import pendulum
from airflow import DAG

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

SHARDS = 8
SRC = "wandb://acme/research"
DEST = "mlflow+https://mlflow.acme.internal"
COMMAND = 'trackbridge sync "$SRC" "$DEST" --shard auto --register-models'

with DAG(
    dag_id="trackbridge_nightly_sync",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
) as dag:
    BashOperator.partial(task_id="sync_shard", bash_command=COMMAND, append_env=True, retries=2).expand(
        env=[{"SRC": SRC, "DEST": DEST, "TRACKBRIDGE_SHARD": f"{k}/{SHARDS}"} for k in range(1, SHARDS + 1)]
    )
