"""Several processes through Accelerate, for real: `accelerate launch` with 2 CPU processes (gloo).

The equivalence test compares a 2-process run with a 1-process run of the same global batch; the
stop tests use a small third-party package (inline plugins do not cross process boundaries) whose
callback acts on one rank only, and a watchdog timeout (engine.testing.launch) that fails on a hang.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.testing import launch, run_recipe, tiny_recipe, write_recipe
from tests.conftest import fake_package, run_cli

WATCHDOG_S = 300  # a hang fails the test instead of blocking the suite

ONE_RANK = '''
import json, math, os, signal
from dataclasses import dataclass
from pathlib import Path
from engine import hookimpl
from engine.schema import opt

class OneRank:
    """On one rank only, at one step: ask to stop, or make the loss NaN."""

    @dataclass
    class Options:
        rank: int = opt(1, "the process that acts")
        step: int = opt(3, "the optimizer step it acts after")
        action: str = opt("stop", "stop or nan")
        report: str = opt("", "folder where every rank writes rank-N.json at the end")

    def __init__(self, options):
        self.options = options

    @hookimpl
    def on_step_end(self, context, metrics):
        o, acc = self.options, context.accelerator
        if acc.process_index != o.rank or context.state.step != o.step:
            return
        if o.action == "stop":
            context.request_stop(f"stop asked on rank {o.rank}")
        elif o.action == "sigterm":  # as a scheduler preempting one process would
            os.kill(os.getpid(), signal.SIGTERM)
        else:  # the next forward pass on this rank gives NaN logits
            head = acc.unwrap_model(context.model).get_output_embeddings()
            head.register_forward_hook(lambda module, args, out: out * math.nan)

    @hookimpl
    def on_train_end(self, context, summary):
        if self.options.report:
            rank = context.accelerator.process_index
            record = {"step": context.state.step, "reason": context.stop_reason}
            (Path(self.options.report) / f"rank-{rank}.json").write_text(json.dumps(record))
'''


@pytest.fixture(scope="module")
def one_rank_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    fake_package(root, "onerankpkg", {"callback.one_rank": "onerank:OneRank"}, {"onerank": ONE_RANK})
    return {"PYTHONPATH": str(root)}


def _recipe(tmp_path, **train):
    recipe = tiny_recipe(
        tmp_path,
        data={"packing": False, "max_length": 48},  # uneven lengths: token weighting matters
        train={"max_steps": 8, "learning_rate": 1e-2, "seed": 3, "eval_every_steps": 3, **train},
    )
    recipe["model"]["config"].update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return recipe


def _records(out, phase):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if f'"phase": "{phase}"' in l]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The 1-process run of global batch 8 that the 2-process runs are compared with (trained once)."""
    folder = tmp_path_factory.mktemp("one")
    run_recipe(_recipe(folder, batch_size=8))
    return folder / "run"


def assert_same_run(run, reference, atol=1e-5):
    """Losses, tokens, evaluations and final weights of two runs agree (2 processes vs 1: float sums differ)."""
    ref_train, train = _records(reference, "train"), _records(run, "train")
    assert [r["step"] for r in train] == [r["step"] for r in ref_train]
    assert [r["loss"] for r in train] == pytest.approx([r["loss"] for r in ref_train], abs=atol)
    assert [r["tokens_seen"] for r in train] == [r["tokens_seen"] for r in ref_train]
    ref_eval, evals = _records(reference, "eval"), _records(run, "eval")
    assert [e["val_tokens"] for e in evals] == [e["val_tokens"] for e in ref_eval]  # each block counted once
    assert [e["val_loss"] for e in evals] == pytest.approx([e["val_loss"] for e in ref_eval], abs=atol)
    ref_weights, weights = load_file(reference / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert weights.keys() == ref_weights.keys()
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, atol=atol, rtol=0, msg=name)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, one_process_run):
    """2 processes x batch 2 x accumulation 2 == 1 process x batch 8: losses, evaluations and weights."""
    path = write_recipe(_recipe(tmp_path / "two", batch_size=2, gradient_accumulation_steps=2), tmp_path / "two.toml")
    result = launch(path, processes=2, timeout=WATCHDOG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = one_process_run, tmp_path / "two" / "run"
    assert json.loads((two / "metrics.json").read_text())["processes"] == 2
    # the global batch, logged once by the main process; one end-of-run summary
    assert "each of 8 blocks (2 processes x batch 2 x accumulation 2)" in result.stdout
    assert result.stdout.count("parameters: ") == 1 and result.stdout.count("run folder") == 1
    train = _records(two, "train")
    assert [r["step"] for r in train] == list(range(1, 9))  # one record per step: only the main process logs
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it trained: the comparison is not of untouched weights
    assert_same_run(two, one)


@pytest.mark.slow
def test_stop_requested_on_one_rank_stops_every_rank_at_that_step(tmp_path, one_rank_package):
    report = tmp_path / "report"
    report.mkdir()
    recipe = _recipe(tmp_path, batch_size=4, max_steps=8)
    recipe.update(callbacks=["one_rank"], one_rank={"rank": 1, "step": 4, "action": "stop", "report": str(report)})
    result = launch(write_recipe(recipe, tmp_path / "r.toml"), processes=2, env=one_rank_package, timeout=WATCHDOG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {p.name: json.loads(p.read_text()) for p in report.iterdir()}
    assert sorted(ranks) == ["rank-0.json", "rank-1.json"]
    assert {r["step"] for r in ranks.values()} == {4}
    assert ranks["rank-1.json"]["reason"] == "stop asked on rank 1"
    assert ranks["rank-0.json"]["reason"] == "stop asked on rank 1 (on process 1)"
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["steps"] == 4 and summary["stopped_early"] and "rank 1" in summary["stop_reason"]
    assert [r["step"] for r in _records(tmp_path / "run", "train")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_nan_loss_on_one_rank_fails_every_rank_cleanly(tmp_path, one_rank_package):
    recipe = _recipe(tmp_path, batch_size=4, max_steps=8)
    recipe.update(callbacks=["one_rank"], one_rank={"rank": 1, "step": 1, "action": "nan"})
    result = launch(write_recipe(recipe, tmp_path / "r.toml"), processes=2, env=one_rank_package, timeout=WATCHDOG_S)
    assert result.returncode == 1
    # the loss is reduced over processes, so rank 0 sees the NaN of rank 1 at the same step
    # both ranks, the same step (their lines may interleave in the shared stderr)
    assert result.stderr.count("training loss is nan (gradient norm nan) at step 2;") == 2, result.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_sigterm_on_one_rank_checkpoints_every_rank_at_that_step_and_resumes(tmp_path, one_rank_package, one_process_run):
    recipe = _recipe(tmp_path, batch_size=4, max_steps=8)
    recipe.update(callbacks=["one_rank"], one_rank={"rank": 1, "step": 3, "action": "sigterm"})
    path = write_recipe(recipe, tmp_path / "r.toml")
    result = launch(path, processes=2, env=one_rank_package, timeout=WATCHDOG_S)
    assert result.returncode not in (0, 2), result.returncode  # interrupted: neither success nor a recipe error
    assert result.stderr.count("stopped by SIGTERM after step 3;") == 2, result.stderr[-3000:]  # both ranks, no hang
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-00000003").is_dir() and not (run / "metrics.json").exists()
    # resume in 2 processes (the plugin acts at step 3 only, which is already done)
    result = launch(path, "train.resume=auto", processes=2, env=one_rank_package, timeout=WATCHDOG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8
    assert [r["step"] for r in _records(run, "train")] == list(range(1, 9))
    # exact resume across processes: the same losses, evaluations and weights as an uninterrupted run of the
    # same global batch (the 1-process run, which 2 uninterrupted processes match to 1e-5)
    assert_same_run(run, one_process_run)


@pytest.mark.slow
def test_device_map_auto_with_several_processes_is_exit_2(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path)
    recipe["model"] = {"base": str(tiny_model_dir), "device_map": "auto"}
    path = write_recipe(recipe, tmp_path / "r.toml")
    # the launcher's environment for process 0 of 2: refused before any process group or model
    result = run_cli(str(path), env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'error: model.device_map: "auto" spreads one process\'s model over the GPUs it sees and cannot be combined with 2 processes' in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_accelerate_launch_cpu_that_started_one_process_of_several_is_exit_2(tmp_path):
    # what `accelerate launch --cpu --num_processes 2` gives its single process (no MPI hostfile)
    path = write_recipe(_recipe(tmp_path), tmp_path / "r.toml")
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    result = run_cli(str(path), env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: accelerate launch --cpu --num_processes N started one process, not N" in result.stderr
    assert "use accelerate launch --multi_gpu --num_processes N" in result.stderr


def test_device_map_auto_in_one_process_trains_and_saves(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, max_steps=2)
    recipe["model"] = {"base": str(tiny_model_dir), "device_map": "auto"}
    summary = run_recipe(recipe)
    assert summary["steps"] == 2
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").config.n_layer == 2
    recipe["model"] = {"config": {"model_type": "gpt2", "n_layer": 1}, "device_map": "auto"}
    recipe["train"]["output_dir"] = str(tmp_path / "other")
    from engine.errors import UserError

    with pytest.raises(UserError, match="model.device_map: .* a model built from model.config"):
        run_recipe(recipe)


@pytest.mark.slow
def test_fsdp_accelerate_config_resolves_to_fsdp2_with_full_state_dict():
    """recipes/accelerate_fsdp.yaml as accelerate launch reads it (FSDP itself needs GPUs: see docs/processes.md)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    from tests.conftest import REPO

    argv = ["--config_file", str(REPO / "recipes/accelerate_fsdp.yaml"), "-m", "engine", "recipes/fsdp.toml"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert args.use_fsdp and args.num_processes == 2 and args.module
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # final/ is one ordinary save_pretrained folder
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    result = run_cli("check", "recipes/fsdp.toml", cwd=REPO)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_fsdp_on_cpu_is_refused_instead_of_quietly_replicating(tmp_path):
    # what accelerate launch --config_file recipes/accelerate_fsdp.yaml puts in a process's environment
    from engine.distributed import has_accelerator_device

    if has_accelerator_device():
        pytest.skip("this machine has a GPU: FSDP is available here")
    path = write_recipe(_recipe(tmp_path), tmp_path / "r.toml")
    result = run_cli(str(path), env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: the Accelerate config asks for FSDP, but Accelerate shards only over GPUs" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "metrics.json").exists()
