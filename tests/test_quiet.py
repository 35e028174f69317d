"""A start prints the trainer's own lines only: the known third-party messages are filtered, nothing else is."""

import subprocess
import sys

from tests.conftest import ROOT

# A distinctive piece of each known message, and the warning categories that used to reach the console.
NOISE = (
    "gemm_4bit_forward",
    "torchvision",
    "gradient_checkpointing_enable",
    "should be kept in float32",
    "FutureWarning",
    "DeprecationWarning",
    "Loading weights",  # transformers' bars at a text encoder's load and save
    "Writing model shards",
)


def run_python(arguments: list[str]) -> subprocess.CompletedProcess:
    """Python in the repository root with default warning filters; stdout and stderr together."""
    return subprocess.run(
        [sys.executable, *arguments], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )


def test_demo_start_is_quiet(tmp_path, model_cache):
    # adamw8bit imports bitsandbytes; gradient checkpointing takes the text encoder's checkpointing call
    short_run = "--max_epochs 1 --max_steps 1 --lr_end_at_low false --sample_prompts null --validation_config null"
    options = f"{short_run} --optimizer adamw8bit --gradient_checkpointing true"
    command = ["train.py", "--config", "configs/demo.json", *options.split()]
    result = run_python([*command, "--logdir", str(tmp_path), "--model_cache_dir", str(model_cache)])
    assert result.returncode == 0, result.stdout
    assert [noise for noise in NOISE if noise in result.stdout] == [], result.stdout
    assert "done: 1 steps" in result.stdout
    assert "saved checkpoint" in result.stdout  # the save, whose bar is checked above, happened


def test_transformers_bars_go_but_the_hubs_download_bars_stay():
    script = (
        "from utils.quiet import quiet_transformers_progress_bars; quiet_transformers_progress_bars(); "
        "import huggingface_hub.utils as hub, transformers.utils.logging as tl; "
        "print(tl.is_progress_bar_enabled(), hub.are_progress_bars_disabled())"
    )
    assert run_python(["-c", script]).stdout.split() == ["False", "False"]


SCRIPT = """
import logging, warnings
from utils.quiet import quiet_third_party_output
quiet_third_party_output()
quiet_third_party_output()
warnings.warn("something else")
bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "no kernels")
bnb.warning("another bitsandbytes message")
logging.getLogger("transformers.utils.import_utils").warning(
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` ...")
diffusers = logging.getLogger("diffusers.models.modeling_utils")
diffusers.warning("There are modules in AutoencoderKL that should be kept in float32: []. Casting directly ...")
diffusers.warning("There are modules in UNet2DConditionModel that should be kept in float32: ['norm']. Casting ...")
"""


def test_only_the_known_messages_are_dropped():
    output = run_python(["-c", SCRIPT]).stdout
    assert "UserWarning: something else" in output
    assert "another bitsandbytes message" in output
    assert "should be kept in float32: ['norm']" in output
    assert "gemm_4bit_forward" not in output
    assert "torchvision" not in output
    assert "float32: []" not in output
