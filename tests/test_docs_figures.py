"""scripts/docs_figures.py: the README's demo sheet puts a run's sample grids in step rows and prompt columns."""

import numpy as np
import pytest
from PIL import Image

from scripts.docs_figures import sample_sheet


def test_sample_sheet_rows_are_steps_and_columns_are_prompts(tmp_path):
    for step in (0, 40, 80):
        for prompt in range(3):
            grey = step + prompt  # tells every grid apart
            Image.fromarray(np.full((8, 16, 3), grey, dtype=np.uint8)).save(tmp_path / f"gs{step:05d}-p{prompt}.png")

    sheet = sample_sheet(tmp_path)

    assert sheet.shape == (3 * 8, 3 * 16, 3)
    assert [[int(sheet[row * 8, column * 16, 0]) for column in range(3)] for row in range(3)] == [
        [0, 1, 2],
        [40, 41, 42],
        [80, 81, 82],
    ]


def test_a_folder_without_samples_is_refused_plainly(tmp_path):
    with pytest.raises(SystemExit, match="holds no sample grids"):
        sample_sheet(tmp_path)
