import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train
from utils.config import (
    FOREIGN_NAMES,
    MAX_STEPS,
    PATH_KEYS,
    ConfigError,
    TrainConfig,
    find_last_checkpoint,
    key_table_markdown,
    load_config,
    parse_overrides,
    resolve_config_paths,
)

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


def test_every_path_key_is_found_beside_the_config(tmp_path, monkeypatch):
    """A relative path that exists only beside the config file is taken from there, under every key of
    PATH_KEYS; the names 'tiny' and 'latest' are not paths, and other keys are not touched."""
    config_dir, elsewhere = tmp_path / "configs", tmp_path / "elsewhere"
    elsewhere.mkdir()
    paths = {key: f"{key}_folder" for key in PATH_KEYS}
    for folder in paths.values():
        (config_dir / folder).mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert set(PATH_KEYS) <= set(TrainConfig.model_fields)
    assert resolve_config_paths(paths, config_dir) == {key: str(config_dir / folder) for key, folder in paths.items()}
    not_paths = {"resume_ckpt": "tiny", "resume_from": "latest", "project_name": "data_root_folder"}
    assert resolve_config_paths(not_paths, config_dir) == not_paths


def test_load_config_takes_paths_from_beside_the_config(tmp_path, data_dir, monkeypatch):
    (tmp_path / "sd15_configs").mkdir()
    (tmp_path / "state").mkdir()
    path = write_config(tmp_path, {"data_root": "images", "single_file_config": "sd15_configs", "resume_from": "state"})
    monkeypatch.chdir(data_dir)
    config = load_config(path)
    assert (config.data_root, config.single_file_config, config.resume_from) == (
        str(data_dir),
        str(tmp_path / "sd15_configs"),
        str(tmp_path / "state"),
    )


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
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "key 'batch_size' = 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_docs_config_keys_lists_every_key():
    page = (ROOT / "docs" / "config-keys.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([\w.]+)` \|", page, flags=re.M))
    schema = set(re.findall(r"^\| `([\w.]+)` \|", key_table_markdown(), flags=re.M))
    regenerate = "replace the table in docs/config-keys.md with the output of `python train.py --help_keys`"
    assert schema - documented == set(), f"docs/config-keys.md is missing keys: {regenerate}"
    assert documented - schema == set(), f"docs/config-keys.md lists keys the schema no longer has: {regenerate}"


# --- issue 14: wrong values accepted ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../../x", "it contains '/'"),
        ("runs\\x", "it contains '\\\\'"),
        ("..", "'..' is a path"),
        (".", "'.' is a path"),
        ("", "it is empty"),
        ("a:b", "it contains ':'"),
        ("-x", "it starts with '-'"),
        ("a\tb", "it contains a control character"),
        (" x", "it starts or ends with a space"),
    ],
)
def test_project_name_must_be_a_plain_folder_name(data_dir, name, problem):
    """A path as project_name wrote the run outside logdir, where resume_from 'latest' never looked."""
    with pytest.raises(
        ConfigError,
        match=rf"key 'project_name' = .*must be a plain folder name \({problem}.*"
        r"such as 'my_style_v2'",
    ):
        load_config(None, {"data_root": str(data_dir), "project_name": name})


@pytest.mark.parametrize("name", ["2024", "my style [v2]", "café", "v1.5"])
def test_plain_folder_names_are_accepted(data_dir, name):
    assert load_config(None, {"data_root": str(data_dir), "project_name": name}).project_name == name


@pytest.mark.parametrize("key", ["logdir", "data_root"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_folder_key_is_refused_not_read_as_the_working_directory(tmp_path, data_dir, key, value):
    path = write_config(tmp_path, {"data_root": str(data_dir), key: value})
    with pytest.raises(ConfigError, match=rf"key '{key}' = \"{value}\": is empty: give a folder"):
        load_config(path)


def test_findlast_finds_a_project_whose_name_holds_glob_brackets(tmp_path, data_dir):
    checkpoint = tmp_path / "logs" / "style [v2]-20240101-000000" / "ckpts" / "gs100"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model_index.json").write_text("{}")
    config = load_config(
        None, {"data_root": str(data_dir), "logdir": str(tmp_path / "logs"), "project_name": "style [v2]"}
    )
    assert find_last_checkpoint(config) == str(checkpoint)


@pytest.mark.parametrize(
    "tokens", [["--lr"], ["--max_epochs", "--lr", "2e-6"], ["--project_name"], ["--validation_config"]]
)
def test_only_true_false_keys_may_stand_alone_on_the_command_line(tokens):
    """A bare --lr became True, that is 1: training at LR 1.0, with exit status 0."""
    key = tokens[0][2:]
    with pytest.raises(ConfigError, match=rf"key '{key}' on the command line has no value: write --{key} VALUE"):
        parse_overrides(tokens)


def test_a_bare_key_the_schema_does_not_know_passes_for_load_config_to_judge(tmp_path, data_dir):
    path = write_config(tmp_path, {"data_root": str(data_dir)})
    assert load_config(path, parse_overrides(["--disable_amp"])).mixed_precision == "no"  # ED2's switch
    with pytest.raises(ConfigError, match=r"Unknown key 'use_8bit_adam' \(command line\): did you mean 'optimizer'"):
        load_config(path, parse_overrides(["--use_8bit_adam"]))


def test_the_schema_types_command_line_values(data_dir):
    """Text keys take the text as written (a project named 2024 was refused as a number)."""
    overrides = parse_overrides(
        [
            "--project_name",
            "2024",
            "--data_root=1e5",
            "--sample_prompts",
            "null",
            "--lr",
            "2e-6",
            "--betas",
            "[0.8, 0.9]",
            "--cache_latents",
            "false",
            "--seed",
            "-1",
            "--prediction_type",
            "null",
            "--optimizer_args",
            '{"d0": 1e-6}',
        ]
    )
    assert overrides == {
        "project_name": "2024",
        "data_root": "1e5",
        "sample_prompts": None,
        "lr": 2e-6,
        "betas": [0.8, 0.9],
        "cache_latents": False,
        "seed": -1,
        "prediction_type": None,
        "optimizer_args": {"d0": 1e-6},
    }
    config = load_config(None, {**overrides, "data_root": str(data_dir)})
    assert (config.project_name, config.lr, config.betas) == ("2024", 2e-6, (0.8, 0.9))


def test_a_bare_non_boolean_key_exits_2_without_training(tmp_path, data_dir, capsys):
    path = write_config(tmp_path, {"data_root": str(data_dir)})
    assert train.main(["--config", str(path), "--max_epochs"]) == 2
    err = capsys.readouterr().err
    assert "key 'max_epochs' on the command line has no value" in err and "Traceback" not in err


def test_values_from_the_command_line_are_blamed_on_it_not_on_the_config_file(tmp_path, data_dir):
    path = write_config(tmp_path, {"data_root": str(data_dir), "batch_size": 0})
    with pytest.raises(ConfigError) as raised:
        load_config(path, parse_overrides(["--lr", "-1", "--project_name", "a/b"]))
    message = str(raised.value)
    assert f"Invalid config (config file '{path}'): key 'batch_size' = 0:" in message
    assert "Invalid config (command line): key 'project_name' = \"a/b\": must be a plain" in message
    assert "; key 'lr' = -1: " in message
    path = write_config(tmp_path, {"data_root": str(data_dir)})
    with pytest.raises(
        ConfigError,
        match=rf"Invalid config \(config file '{re.escape(str(path))}' and the command "
        r"line\): lr_min \(1\) must not exceed lr",
    ):
        load_config(path, {"lr_min": 1, "lr": 0.5})


def test_a_folder_given_as_config_is_named_as_a_folder(tmp_path):
    (tmp_path / "train.json").write_text("{}")
    with pytest.raises(
        ConfigError,
        match=rf"config file '{re.escape(str(tmp_path))}' is a folder, not a file: give "
        rf"the path of the file itself, such as '{re.escape(str(tmp_path))}/train",
    ):
        load_config(tmp_path)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_configs_with_a_byte_order_mark_are_read(tmp_path, data_dir, encoding):
    """Windows Notepad writes UTF-8 with a BOM, and UTF-16 with a BOM as "Unicode"."""
    (tmp_path / "val.json").write_text('{"seed": 7}', encoding=encoding)
    path = tmp_path / "train.json"
    path.write_text(
        json.dumps(
            {"data_root": str(data_dir), "project_name": "café", "validation_config": "val.json"}, ensure_ascii=False
        ),
        encoding=encoding,
    )
    config = load_config(path)
    assert (config.project_name, config.validation.seed) == ("café", 7)


@pytest.mark.parametrize(
    "content, problem",
    [
        (
            '{\n  "project_name": "café"\n}'.encode("latin-1"),
            r"the byte 0xe9 at line 2, column 23 is not UTF-8 \(perhaps the file is Latin-1",
        ),
        (
            '{"project_name": "x"}'.encode("utf-16-le"),
            "it holds NUL bytes: it looks like UTF-16 written without a byte",
        ),
        (b"\xef\xbb\xbf{\xff}", "it starts with a UTF-8 byte-order mark, but byte 1 after it is not UTF-8"),
    ],
)
@pytest.mark.parametrize("what", ["config", "validation_config"])
def test_a_file_that_is_not_text_is_named_with_its_problem(tmp_path, data_dir, content, problem, what):
    (tmp_path / "bad.json").write_bytes(content)
    config = {"data_root": str(data_dir), "validation_config": "bad.json"}
    path = tmp_path / "bad.json" if what == "config" else write_config(tmp_path, config)
    with pytest.raises(
        ConfigError,
        match=rf"{what} file '.*bad.json' is not readable text: {problem}.*Save it as "
        r"UTF-8",
    ):
        load_config(path)


def test_run_lengths_beyond_max_steps_are_refused(data_dir):
    """max_steps 100000000000 hung --plot_schedule, which listed every step."""
    for key in ("max_steps", "max_epochs"):
        with pytest.raises(ConfigError, match=rf"key '{key}' = 100000000000: must be at most 10,000,000"):
            load_config(None, {"data_root": str(data_dir), key: 100_000_000_000})
        assert getattr(load_config(None, {"data_root": str(data_dir), key: MAX_STEPS}), key) == MAX_STEPS


@pytest.mark.parametrize(
    "written, suggested, whose",
    [
        ("learning_rate", "'lr'", "learning_rate is diffusers'/kohya's/OneTrainer's name for it"),
        ("learning_rat", "'lr'", "learning_rate is diffusers'/kohya's/OneTrainer's name for it"),
        ("train_batch_size", "'batch_size'", "train_batch_size is diffusers'/kohya's name for it"),
        ("num_train_epochs", "'max_epochs'", "num_train_epochs is diffusers' name for it"),
        ("max_train_epochs", "'max_epochs'", "max_train_epochs is kohya's name for it"),
        ("max_train_steps", "'max_steps'", "max_train_steps is diffusers'/kohya's name for it"),
        ("epochs", "'max_epochs'", "epochs is OneTrainer's name for it"),
        (
            "gradient_accumulation_steps",
            "'grad_accum'",
            "gradient_accumulation_steps is diffusers'/kohya's/OneTrainer's name for it",
        ),
        ("adam_beta2", "'betas'", 'adam_beta2 is diffusers\' name for it; write "betas": [beta1, beta2]'),
        ("lr_warmup", "'lr_warmup_steps'", None),
    ],
)
def test_unknown_keys_suggest_our_key_for_other_trainers_names(tmp_path, data_dir, written, suggested, whose):
    path = write_config(tmp_path, {"data_root": str(data_dir), written: 1})
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"Unknown key '{written}' (config file '{path}'): did you mean {suggested}")
    assert (f"({whose}.)" in message) if whose else ("name for it" not in message)


def test_other_trainers_names_map_to_keys_of_the_schema_and_only_where_those_are_valid(tmp_path, data_dir):
    assert {key for key, _ in FOREIGN_NAMES.values()} <= set(TrainConfig.model_fields)
    (tmp_path / "val.json").write_text(json.dumps({"learning_rate": 1}))
    path = write_config(tmp_path, {"data_root": str(data_dir), "validation_config": "val.json"})
    with pytest.raises(ConfigError, match=r"Unknown key 'learning_rate' \(validation config .*\)\. Run"):
        load_config(path)
