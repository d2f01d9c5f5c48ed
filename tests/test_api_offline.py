"""The Python API offline: the docs' example runs as written, and its errors are clear."""

import re
import shutil

import pytest

from engine import CONFIG, LanguageModelTrainer, TextDataset
from engine.errors import UserError
from tests.conftest import REPO


def _example_block() -> str:
    page = (REPO / "docs" / "python-api.md").read_text(encoding="utf-8")
    return re.search(r"<!-- offline-api-example -->\n```python\n(.*?)\n```", page, re.S).group(1)


def _texts(folder):
    text = (REPO / "recipes" / "data" / "quickstart.txt").read_text(encoding="utf-8")
    (folder / "my_text").mkdir()
    (folder / "my_text" / "diary.txt").write_text(text[:12000], encoding="utf-8")
    (folder / "my_text" / "letters.txt").write_text(text[-12000:], encoding="utf-8")


@pytest.mark.slow
def test_offline_api_example_runs_as_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _texts(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "quickstart" / "final")  # a finished run of 128-token context
    (tmp_path / "runs" / "quickstart" / "recipe.toml").write_text('[train]\nfinal_dir = "final"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scope = {}
    exec(compile(_example_block(), "docs/python-api.md", "exec"), scope)
    summary, trainer = scope["summary"], scope["trainer"]
    assert summary["steps"] > 0 and (tmp_path / "runs" / "api" / "final_model" / "adapter_config.json").exists()
    printed = capsys.readouterr().out
    assert re.search(r"\{'loss': [\d.]+, 'perplexity': [\d.]+, 'tokens': \d+\}", printed)
    assert trainer.model is not None


def test_api_errors_name_base_model_not_model_base(tmp_path, monkeypatch):
    _texts(tmp_path)
    monkeypatch.chdir(tmp_path)
    trainer = LanguageModelTrainer({**CONFIG, "base_model": str(tmp_path / "no_such_model"), "data_dir": "my_text"})
    with pytest.raises(UserError) as caught:
        trainer.train()
    line = caught.value.lines[0]
    assert line.startswith("base_model: ") and "model.base" not in line


def test_api_error_in_config_terms_keeps_other_words():
    from engine.api import in_config_terms

    exc = in_config_terms(UserError("data.max_length: 512 is longer than the model's context (128); set it to 128",
                                    "model.tokenizer: folder 'x' has no tokenizer; model.base stays"))
    assert exc.lines[0].startswith("max_length: 512") and exc.lines[1] == "model.tokenizer: folder 'x' has no tokenizer; base_model stays"


def test_dataset_longer_than_the_context_is_a_clear_error(tiny_model_dir, tmp_path):
    _texts(tmp_path)
    trainer = LanguageModelTrainer()
    trainer.load_model(tiny_model_dir)  # context 128
    with pytest.raises(UserError, match=r"more than the model's context \(128\).*TextDataset\(path, trainer.tokenizer, 128\)"):
        trainer.evaluate_model(TextDataset(str(tmp_path / "my_text" / "diary.txt"), trainer.tokenizer, 512))
    result = trainer.evaluate_model(TextDataset(str(tmp_path / "my_text" / "diary.txt"), trainer.tokenizer, 128))
    assert result["tokens"] > 1000 and result["loss"] > 0


def test_text_dataset_refuses_more_than_the_tokenizers_limit(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    _texts(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, model_max_length=128)
    with pytest.raises(UserError, match=r"TextDataset: max_length 512 is longer than the model's context \(128"):
        TextDataset(str(tmp_path / "my_text" / "diary.txt"), tokenizer, 512)
