"""samples/index.json: which grid file holds which prompt at which step, for compare.py.

Kept apart from trainer/sampling.py so that reading it needs neither torch nor diffusers: compare.py starts
in a second, not in ten.
"""

from __future__ import annotations

import json
from pathlib import Path

from utils.checkpoint import atomic_path

INDEX_FILE = "index.json"


def record_in_index(samples_dir: Path, step: int, entries: list[dict]) -> None:
    """Add a round ({prompt index: entry}) under its step, atomically: compare.py may read the index while the
    run goes on, and must never see half a file."""
    index = read_index(samples_dir)
    index[step] = dict(enumerate(entries))
    serialisable = {str(s): {str(i): entry for i, entry in prompts.items()} for s, prompts in sorted(index.items())}
    index_path = Path(samples_dir) / INDEX_FILE
    with atomic_path(index_path) as temporary:
        temporary.write_text(json.dumps(serialisable, indent=1) + "\n", encoding="utf-8")


def read_index(samples_dir: Path) -> dict[int, dict[int, dict]]:
    """step -> prompt index -> entry (file, prompt, negative_prompt, seed, size, cfgs, scheduler,
    num_inference_steps, and random_seed / random_caption: true when the round drew them); empty when the run
    made no samples."""
    index_path = Path(samples_dir) / INDEX_FILE
    if not index_path.is_file():
        return {}
    raw = json.loads(index_path.read_text(encoding="utf-8"))
    return {int(step): {int(i): entry for i, entry in prompts.items()} for step, prompts in raw.items()}
