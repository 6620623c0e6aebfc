"""InternEvo bin/meta data files written the way InternEvo's own tools write them, for the data tests."""

from __future__ import annotations

import json
import os

import numpy as np


def write_internevo(bin_path, docs, dtype=np.int32) -> None:
    """A .bin/.bin.meta pair as InternEvo's tools write it: one json.dumps line per document, then
    a meta of (byte offset, token count) rows saved with np.save."""
    os.makedirs(os.path.dirname(bin_path), exist_ok=True)
    rows, offset = [], 0
    with open(bin_path, "wb") as f:
        for doc in docs:
            line = str.encode(json.dumps({"tokens": doc}) + "\n")
            f.write(line)
            rows.append((offset, len(doc)))
            offset += len(line)
    with open(str(bin_path) + ".meta", "wb") as f:
        np.save(f, np.array(rows, dtype=dtype).reshape(-1, 2))
