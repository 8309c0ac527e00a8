"""MLflow: one run per run directory, in an sqlite store inside it unless log.mlflow_uri says."""

from __future__ import annotations

import logging
import time
from typing import Any

from dist_train.track.backend import run_summary, scalars, summary_markdown

# The lowest value limit MLflow servers have had (newer ones take 6000): a param that fits
# this fits every server a user may point log.mlflow_uri at.
MAX_PARAM_CHARS = 500
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call


class MlflowTracker:
    def __init__(
        self,
        uri: str,
        experiment: str,
        name: str,
        hparams: dict[str, Any],
        run_id: str | None,
        artifact_location: str | None,
    ) -> None:
        """`run_id`: the run an earlier attempt of this run directory started, to continue."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        # The sqlite store reports its schema migrations at INFO on our console.
        for logger in ("mlflow", "alembic"):
            logging.getLogger(logger).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(experiment, artifact_location=artifact_location)
        )
        run = None
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException:  # another store now (log.mlflow_uri changed): a new run
                run = None
        if run is None:
            run = self.client.create_run(experiment_id, run_name=name)
        self.run_id: str | None = run.info.run_id
        self.pending: list[Any] = []  # the asynchronous writes, waited for at close
        # MLflow params cannot change once logged: a resumed run adds only new keys (the
        # current values are in RUN_DIR/config.yaml).
        params = [
            Param(key, str(value)[:MAX_PARAM_CHARS])
            for key, value in hparams.items()
            if key not in run.data.params
        ]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + PARAMS_PER_BATCH])

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if (facts := run_summary(record)) is not None:  # the run's description in the UI
            self.client.set_tag(self.run_id, "mlflow.note.content", summary_markdown(facts))
            return
        now_ms, step = int(time.time() * 1000), record["step"]
        metrics = [Metric(k, v, now_ms, step) for k, v in scalars(record).items()]
        # Asynchronous: an sqlite write takes tens of ms, too long for a training step to wait.
        self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def close(self, finished: bool) -> None:
        for operation in self.pending:
            operation.wait()
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")
