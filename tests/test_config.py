import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from train import parse_overrides
from utils.config import ConfigError, TrainConfig, key_table_markdown, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


def write_config(tmp_path, data: dict) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    return path


def test_json_and_cli_override(tmp_path, data_dir):
    path = write_config(tmp_path, {"data_root": str(data_dir), "lr": 1e-6, "batch_size": 4})
    config = load_config(path, parse_overrides(["--lr", "2e-6", "--gradient_checkpointing"]))
    assert config.lr == 2e-6
    assert config.batch_size == 4
    assert config.gradient_checkpointing is True


def test_unknown_key_suggests_nearest(tmp_path, data_dir):
    path = write_config(tmp_path, {"data_root": str(data_dir), "batch_szie": 4})
    with pytest.raises(ConfigError, match=r"Unknown key 'batch_szie'.*did you mean 'batch_size'"):
        load_config(path)


def test_unknown_cli_key_suggests_nearest(data_dir):
    with pytest.raises(ConfigError, match=r"'max_epoch'.*did you mean 'max_epochs'"):
        load_config(None, {"data_root": str(data_dir), "max_epoch": 3})


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lr", -1e-6, r"key 'lr' = -1e-06: .*greater than 0"),
        ("batch_size", 0, r"key 'batch_size' = 0: .*greater than or equal to 1"),
        ("resolution", 500, r"key 'resolution' = 500: must be a multiple of 64 \(nearest: 512\)"),
        ("mixed_precision", "fp8", r"key 'mixed_precision' = \"fp8\": .*'auto', 'no', 'fp16' or 'bf16'"),
        ("lr_scheduler", "cosin", r"key 'lr_scheduler' = \"cosin\": must be one of .*did you mean 'cosine'"),
        ("max_epochs", "ten", r"key 'max_epochs' = \"ten\": .*valid integer"),
    ],
)
def test_bad_values_name_key_value_and_valid_range(tmp_path, data_dir, key, value, expected):
    path = write_config(tmp_path, {"data_root": str(data_dir), key: value})
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_data_root(tmp_path):
    path = write_config(tmp_path, {"data_root": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"key 'data_root' = '.*nope': no such folder"):
        load_config(path)


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "lr": 1e-6,\n  "batch_size": 4,\n}\n')
    with pytest.raises(ConfigError, match=r"line 4, column 1"):
        load_config(path)


def test_null_means_default(tmp_path, data_dir):
    path = write_config(tmp_path, {"data_root": str(data_dir), "log_step": None, "lr_min": None})
    config = load_config(path)
    assert config.log_step == TrainConfig.model_fields["log_step"].default
    assert config.lr_min == 0.0


def test_validation_config_file_relative_to_config(tmp_path, data_dir):
    (tmp_path / "val.json").write_text(json.dumps({"auto_split_proportion": 0.2, "seed": 7}))
    path = write_config(tmp_path, {"data_root": str(data_dir), "validation_config": "val.json"})
    config = load_config(path)
    assert config.validation.enabled and config.validation.auto_split_proportion == 0.2
    assert config.validation.seed == 7


def test_validation_config_unknown_key(tmp_path, data_dir):
    (tmp_path / "val.json").write_text(json.dumps({"auto_split_proportoin": 0.2}))
    path = write_config(tmp_path, {"data_root": str(data_dir), "validation_config": "val.json"})
    with pytest.raises(ConfigError, match=r"'auto_split_proportoin'.*did you mean 'auto_split_proportion'"):
        load_config(path)


def test_lr_min_above_lr_refused(tmp_path, data_dir):
    path = write_config(tmp_path, {"data_root": str(data_dir), "lr": 1e-6, "lr_min": 2e-6})
    with pytest.raises(ConfigError, match=r"lr_min \(2e-06\) must not exceed lr \(1e-06\)"):
        load_config(path)


def test_cli_user_error_exits_nonzero_without_traceback(tmp_path, data_dir):
    path = write_config(tmp_path, {"data_root": str(data_dir), "batch_size": 0})
    result = subprocess.run([sys.executable, "train.py", "--config", str(path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "key 'batch_size' = 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme = readme.split("## Every config key", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([\w.]+)` \|", readme, flags=re.M))
    schema = set(re.findall(r"^\| `([\w.]+)` \|", key_table_markdown(), flags=re.M))
    assert schema - documented == set(), "README key table is missing keys: run `python train.py --help_keys`"
    assert documented - schema == set(), "README documents keys the schema no longer has"
