"""The optional sinks tensorboard and mlflow, read back with their own libraries' readers.

They need the extras (pip install -e ".[test]" installs both); without them these tests skip and say so.
"""

import json
import os

import pytest

from engine import UserError, run_recipe, tiny_recipe


def extra(module: str, name: str):
    try:
        return pytest.importorskip(module, reason=f"the {name} extra is not installed: pip install -e '.[{name}]' (or '.[test]')")
    except pytest.skip.Exception:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs the test extra, which includes {name}")
        raise


def jsonl(run, phase):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["phase"] == phase]


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)], events


def recipe_for(tmp_path, sinks, **train):
    return tiny_recipe(tmp_path, sinks=["jsonl", *sinks], train={"max_steps": 8, "eval_every_steps": 4, **train})


# ------------------------------------------------------------------ tensorboard
@pytest.mark.slow
def test_tensorboard_event_files_hold_every_logged_metric_and_a_resume_replaces_the_redone_steps(tmp_path, monkeypatch):
    extra("tensorboard", "tensorboard")
    extra("mlflow", "mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    recipe = recipe_for(tmp_path, ["tensorboard", "mlflow"], save_every_steps=4)
    run_recipe(recipe)
    run = tmp_path / "run"
    loss, events = scalars(run / "tensorboard", "train/loss")
    expected = [(r["step"], r["loss"]) for r in jsonl(run, "train")]
    assert [s for s, _ in loss] == list(range(1, 9))
    assert [v for _, v in loss] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 in the event file
    val, _ = scalars(run / "tensorboard", "eval/val_loss")
    assert val == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in jsonl(run, "eval")] and len(val) == 2
    assert "recipe/text_summary" in events.Tags()["tensors"]

    # resume from the step-4 checkpoint: steps 5-8 are trained again, and TensorBoard shows each step once
    from engine.checkpoint import name_for

    run_recipe({**recipe, "train": {**recipe["train"], "resume": str(run / "checkpoints" / name_for(4))}})
    loss, _ = scalars(run / "tensorboard", "train/loss")
    assert [s for s, _ in loss] == list(range(1, 9))
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in jsonl(run, "train")], rel=1e-6)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    client, found = mlflow_run((run / "mlruns").as_uri())  # mlflow: the resumed run continues its MLflow run
    assert found.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(found.info.run_id, "train/loss")} == set(range(1, 9))


# ------------------------------------------------------------------ mlflow
def mlflow_run(uri, experiment="tunesmith"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


@pytest.mark.slow
def test_mlflow_records_the_recipe_the_metrics_by_step_and_the_final_model(tmp_path, monkeypatch):
    extra("mlflow", "mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # so this test's own client may read the file store
    run_recipe(recipe_for(tmp_path, ["mlflow"]))
    run = tmp_path / "run"
    client, found = mlflow_run((run / "mlruns").as_uri())
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["train.learning_rate"] == "0.003" and found.data.params["sinks"] == "['jsonl', 'mlflow']"
    assert found.data.params["model.config"].startswith("{'model_type': 'gpt2'")
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"])) for r in jsonl(run, "train")]
    val = client.get_metric_history(found.info.run_id, "eval/val_loss")
    assert sorted(m.step for m in val) == [4, 8]
    assert found.data.metrics["summary/steps"] == 8
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= artifacts
    local = client.download_artifacts(found.info.run_id, "model/model.safetensors", str(tmp_path))
    assert open(local, "rb").read() == (run / "final" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_mlflow_tracking_uri_comes_from_the_environment_or_the_option(tmp_path, monkeypatch):
    extra("mlflow", "mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    elsewhere = (tmp_path / "central").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    run_recipe(recipe_for(tmp_path / "a", ["mlflow"], max_steps=2, eval_every_steps=0))
    assert not (tmp_path / "a" / "run" / "mlruns").exists()
    assert mlflow_run(elsewhere)[1].info.status == "FINISHED"
    option = (tmp_path / "chosen").as_uri()
    run_recipe(recipe_for(tmp_path / "b", ["mlflow"], max_steps=2, eval_every_steps=0)
               | {"mlflow": {"tracking_uri": option, "experiment": "mine", "log_model": False}})
    client, found = mlflow_run(option, "mine")
    assert client.list_artifacts(found.info.run_id) == []


def test_a_missing_extra_is_one_clear_error(tmp_path, monkeypatch):
    """Without the package, selecting the sink stops before training with the install command."""
    import sys

    for module in ("mlflow", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    for sink, package in (("mlflow", "mlflow"), ("tensorboard", "tensorboard")):
        with pytest.raises(UserError) as info:
            run_recipe(recipe_for(tmp_path / sink, [sink]))
        assert info.value.lines == [f"plugin '{sink}' from package tunesmith: sinks: '{sink}' needs the {package} package: "
                                    f"pip install 'tunesmith[{package}]' (or pip install {package if package != 'mlflow' else 'mlflow-skinny'})"]
    assert not (tmp_path / "mlflow" / "run" / "final").exists()
