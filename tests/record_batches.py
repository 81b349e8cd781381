"""`python tests/record_batches.py OUT [train.py's arguments]`: train.py, with every batch handed to the training
step (from the device cache or the loader) recorded as one line per sample, `<sha1 of its pixels>`, appended to
OUT/rank<R>.txt: which samples a run drew, for tests/test_data.py's world-size change."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from gan_dist import data  # noqa: E402

out = Path(sys.argv[1])
draw = data.DeviceBatches.__next__


def recorded(self):
    images, labels = draw(self)
    with (out / f"rank{os.environ.get('RANK', '0')}.txt").open("a") as f:
        f.writelines(hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest() + "\n" for image in images)
    return images, labels


data.DeviceBatches.__next__ = recorded
sys.argv = ["train.py", *sys.argv[2:]]
sys.exit(train.main())
