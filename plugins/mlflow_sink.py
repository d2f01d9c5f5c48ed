"""MLflow sink: one MLflow run per training run, through MlflowClient (the `mlflow` extra: mlflow-skinny).

Built on the public plugin API only, like a third-party sink.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from engine import UserError, hookimpl, opt

INSTALL = "pip install 'tunesmith[mlflow]' (or pip install mlflow-skinny)"


def flatten(table, prefix=""):
    """{"train": {"epochs": 3}} -> {"train.epochs": "3"}: the recipe as MLflow params."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and value and key != "config":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def is_local(uri):
    return "://" not in uri or uri.startswith("file:")


class MLflow:
    """Logs the resolved recipe as params, training logs and evaluations as metrics by step, and the final model as an artifact to MLflow."""

    @dataclass
    class Options:
        tracking_uri: str = opt("", "where runs are recorded; empty: $MLFLOW_TRACKING_URI, else a file store in mlruns/ in the run folder")
        experiment: str = opt("tunesmith", "experiment name ($MLFLOW_EXPERIMENT_NAME wins when set)")
        run_name: str = opt("", "run name; empty: the run folder's name")
        log_model: bool = opt(True, "at the end, upload the final model folder as the run's artifact model/")

    def __init__(self, options: Options):
        self.options = options
        self.client = None
        self.run_id = None
        self.params = None
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UserError(f"sinks: 'mlflow' needs the mlflow package: {INSTALL}") from None

    @hookimpl
    def on_train_start(self, context):
        if not context.is_main_process:
            return
        from mlflow.tracking import MlflowClient

        o = self.options
        uri = o.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            uri = context.run_file("mlruns").resolve().as_uri()  # a local store in the run folder
        if is_local(uri):  # mlflow 3 refuses its file store unless told it is wanted
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or o.experiment
        self.run_name = o.run_name or Path(context.output_dir).resolve().name
        self.params = flatten(context.recipe.resolved())

    def _run(self):
        """The MLflow run, started at the first log (after load_plugin_state, so a resumed run continues its own)."""
        if self.run_id is None:
            try:
                found = self.client.get_experiment_by_name(self.experiment)
                experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
                self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
            except Exception as exc:  # an unreachable server, a bad URI
                raise UserError(f"mlflow: could not start a run at {self.uri} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                f"check mlflow.tracking_uri or MLFLOW_TRACKING_URI") from None
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in self.params.items()])
        return self.run_id

    @hookimpl
    def log_metrics(self, metrics, step, phase):
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(f"{phase}/{k}", float(v), now, step) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.client.log_batch(self._run(), metrics=values)

    @hookimpl
    def on_train_end(self, context, summary):
        if self.client is None:
            return
        run_id = self._run()
        final = Path(context.output_dir) / context.recipe.train.final_dir
        if self.options.log_model and final.is_dir():
            self.client.log_artifacts(run_id, str(final), "model")
        self.client.set_terminated(run_id, "FINISHED")

    @hookimpl
    def plugin_state(self):
        return {"run_id": self.run_id} if self.run_id else None

    @hookimpl
    def load_plugin_state(self, state):
        if self.client is not None and state.get("run_id"):
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
