import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _share_the_cores() -> None:
    """Under pytest-xdist (-n N), each worker and the processes it starts use their share of the cores for
    torch's threads: N workers each spinning threads on every core run slower together than one alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads  # read when torch loads, here and in subprocesses
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))


_share_the_cores()


def run_cli(*args: str, cwd: Path | str = REPO, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m engine ARGS` as a user would; returns the finished process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def in_ci() -> bool:
    """CI=true, CI=1, CI=yes... (CI services set different truthy values)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With -n N (pytest-xdist) and no --dist of the user's: each file's tests go to one worker, so the
    expensive module fixtures (a reference run trained once for a file's tests) run once, not once per worker."""
    if config.option.dist == "load":
        from xdist.scheduler import LoadFileScheduling

        return LoadFileScheduling(config, log)
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip, with the reason, where torch sees no CUDA device."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (tinyshakespeare). Skips loudly when missing; under CI (any value but empty/0/false/no) it fails instead."""
    if not (SHARED / "tinyshakespeare-train.txt").exists():
        reason = f"SHARED DATA MISSING: {SHARED} not found; these tests need ../shared/data beside the repo"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small GPT-2 with a BPE tokenizer, saved with save_pretrained to a local folder (no hub)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.model import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    text = (REPO / "recipes" / "data" / "quickstart.txt").read_text(encoding="utf-8").split("\n\n")
    tokenizer = train_tokenizer(text[:400], vocab_size=512)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def direct_val_numbers(model, tokenizer, documents, max_length: int, packing: str = "concat") -> tuple[float, int, int]:
    """(nats, predicted tokens, characters) of documents straight from transformers' loss, independent of
    engine.evaluation. Each document is followed by EOS; "concat": the documents concatenated, in windows of
    max_length overlapping by one token (every token but the first predicted once); "isolated": each document
    on its own (its first token is not predicted), exact when each fits in max_length. Characters count
    each document and its end."""
    import torch

    eos = tokenizer.eos_token_id
    docs = [tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos] for doc in documents]
    streams = [[t for ids in docs for t in ids]] if packing == "concat" else docs
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for ids in streams:
            if packing != "concat":
                assert len(ids) <= max_length, "isolated: a document longer than max_length is cut where its block is full"
            for start in range(0, len(ids) - 1, max_length - 1):
                window = torch.tensor([ids[start : start + max_length]])
                if window.shape[1] >= 2:
                    nats += model(input_ids=window, labels=window).loss.item() * (window.shape[1] - 1)
                    tokens += window.shape[1] - 1
    assert tokens == sum(len(ids) - 1 for ids in streams)
    return nats, tokens, sum(len(d) + 1 for d in documents)


def fake_package(root, name, entry_points, modules):
    """A package visible to importlib.metadata: a dist-info folder plus modules, under `root` (for PYTHONPATH)."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[tunesmith]\n{lines}\n")
    for mod, source in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture(scope="session", autouse=True)
def tokenization_cache(tmp_path_factory):
    """Tests (and the CLI runs they start) keep the tokenization cache in a temporary folder, not ~/.cache."""
    folder = tmp_path_factory.mktemp("tunesmith-cache")
    old = os.environ.get("TUNESMITH_CACHE")
    os.environ["TUNESMITH_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("TUNESMITH_CACHE", None)
    else:
        os.environ["TUNESMITH_CACHE"] = old
