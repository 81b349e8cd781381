"""Read an offline W&B run file (`run-<id>.wandb`) without network or login, for tests.

wandb 0.31 has no Python reader: the file is LevelDB-log framing (a 7-byte ':W&B' header, 32 KiB blocks, 7-byte
record headers: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) around `wandb_internal_pb2.Record` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024


def records(path: str | Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunks)
            yield rec


def history(path: str | Path) -> list[dict]:
    """History rows as {key: decoded JSON value}; nested keys (images) are joined with '/'."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in rec.history.item})
    return rows


def run_id(path: str | Path) -> str:
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run.run_id
    raise ValueError(f"no run record in {path}")


def config(path: str | Path) -> dict:
    """The run config as {key: decoded JSON value} (top-level keys; later updates win)."""
    out = {}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        items = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        out |= {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}
    return out


def summary(path: str | Path) -> dict:
    """The run summary as {key: decoded JSON value} (later updates win)."""
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            out |= {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in rec.summary.update}
    return out
