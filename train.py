"""EveryCycle: fine-tune Stable Diffusion 1.x / 2.x.

python train.py --config damon.json [--key value ...]      train (any config key can be overridden)
python train.py --config damon.json --plot_schedule [DIR]  preview the LR schedule and memory, no weights loaded
python train.py --config damon.json --find_lr [--find_lr_write new.json]   LR range test, suggests lr_min and lr
python train.py --help_keys                                 every config key, its default and meaning
accelerate launch --multi_gpu --num_processes 4 train.py --config damon.json    the same run on 4 GPUs (DDP)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.config import ConfigError, key_table_markdown, load_config, parse_overrides
from utils.launch import launched_processes
from utils.quiet import quiet_third_party_output


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other --key value pair overrides that config key (e.g. --lr 2e-6 --max_epochs 50); a true/false "
        "key may stand alone (--gradient_checkpointing).",
    )
    parser.add_argument("--config", type=Path, help="the JSON config of the run")
    parser.add_argument(
        "--plot_schedule",
        nargs="?",
        const="",
        default=None,
        metavar="OUT_DIR",
        help="write lr_schedule.csv/.png, print the schedule summary and the memory forecast, then exit",
    )
    parser.add_argument(
        "--num_processes",
        type=int,
        default=None,
        metavar="N",
        help="with --plot_schedule: preview for N processes (GPUs); default: the launcher's, else 1",
    )
    parser.add_argument(
        "--find_lr",
        action="store_true",
        help="LR range test: ramp the LR, score the probe loss, suggest lr_min and lr, then exit",
    )
    parser.add_argument(
        "--find_lr_write",
        type=Path,
        metavar="NEW_JSON",
        help="with --find_lr (implied): write a copy of the config that cycles over the suggestion",
    )
    parser.add_argument("--help_keys", action="store_true", help="print every config key and exit")
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(rest)


def preview_processes(requested: int | None) -> int:
    """The process count a schedule preview plans for: --num_processes, else the launcher's (WORLD_SIZE)."""
    count = requested if requested is not None else launched_processes()
    if count < 1:
        raise ConfigError(f"--num_processes {count}: give 1 or more processes.")
    return count


def main(argv: list[str] | None = None) -> int:
    quiet_third_party_output()  # first: torch, diffusers, transformers and bitsandbytes load below, in the branches
    try:
        args, overrides = parse_arguments(sys.argv[1:] if argv is None else argv)
        if args.help_keys:
            print(key_table_markdown())
            return 0
        config = load_config(args.config, overrides)
        if args.plot_schedule is not None:
            from optimizer.preview import preview_schedule
            from trainer.memory_forecast import forecast_report

            preview_schedule(config, Path(args.plot_schedule or "."), preview_processes(args.num_processes))
            for line in forecast_report(config):  # weights and activations on meta tensors: nothing is loaded
                print(line)
            return 0
        if args.num_processes is not None:
            raise ConfigError(
                "--num_processes only sets the preview's process count (with --plot_schedule); to "
                f"train on {args.num_processes} processes run: accelerate launch --multi_gpu "
                f"--num_processes {args.num_processes} train.py --config ..."
            )
        if args.find_lr or args.find_lr_write:
            from trainer.lr_finder import find_lr_command

            return find_lr_command(config, args.config, overrides, args.find_lr_write)
        from accelerate import PartialState

        from trainer.loop import train

        summary = train(config)
        if not PartialState().is_main_process:  # under accelerate launch the main process reports
            return summary["exit_code"]
        if summary["stopped"]:
            print(f"stopped ({summary['stopped']}) after {summary['steps']} steps; outputs in {summary['run_dir']}")
            return summary["exit_code"]  # 130 SIGINT, 143 SIGTERM, 1 divergence or a failed save
        print(f"done: {summary['steps']} steps; outputs in {summary['run_dir']}")
        return 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk (full, read-only) refused a write the trainer does not handle itself
        print(
            f"error: {error}. Saved states and checkpoints are intact (every save is atomic): free some space or "
            f"choose another logdir, then run the same command with --resume_from latest.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training started: there is nothing to save yet
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
