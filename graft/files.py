"""The one rule for every file and folder graft writes (`--out`, `--json`, `--plot`, `--answers`,
exports): a file or folder that graft did not write is never replaced without `--force`; nothing
is written through a symbolic link (the link could lead anywhere: give the path it points to);
files are written beside their place and renamed into it, so a failure leaves the old file as it
was and nothing half-written; an operating-system error is one line that names the path.

Whether graft wrote a file is read from the file itself: a bench report is a JSON object with
graft's keys, answer records name a `graft-` model, and graft's plots carry a PNG text chunk.
"""
from __future__ import annotations

import json
import os

from .config import GraftError, atomic_write_bytes

PLOT_TAG = ("Software", "graft bench")  # the PNG text chunk graft's plots carry


def refuse_link(path: str, what: str) -> None:
    if os.path.islink(path):
        raise GraftError(f"{what} {path} is a symbolic link, and graft does not write through links: give the path "
                         f"it points to ({os.path.realpath(path)}) or another one")


def check_parent(path: str, what: str) -> None:
    """The folder `path` goes into exists as a folder or can be made, and can be written."""
    parent = os.path.dirname(os.path.abspath(path))
    above = parent
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise GraftError(f"{what} {path} lies under {above}, which is a file, not a folder: choose another path")
    if not os.access(above, os.W_OK | os.X_OK):
        raise GraftError(f"{what} {path} cannot be written: {above} is not writable (read-only or not yours); choose "
                         "another path")


def check_output_file(path: str, what: str, force: bool, ours) -> None:
    """Refuse, before any work, a file target graft may not write: a link, a folder, a file graft
    did not write (`ours(path)` says whether it did) unless `force`, an unwritable place."""
    refuse_link(path, what)
    if os.path.isdir(path):
        raise GraftError(f"{what} {path} is a folder: give a file path")
    if os.path.exists(path) and not force and not ours(path):
        raise GraftError(f"{what} {path} exists and was not written by graft: choose another path, or pass --force "
                         "to replace it")
    check_parent(path, what)


def write_output_file(path: str, data: bytes, what: str, force: bool, ours) -> None:
    """`check_output_file`, then write beside it and rename into place."""
    check_output_file(path, what, force, ours)
    atomic_write_bytes(path, data)


def _json(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(1 << 26))
    except (OSError, ValueError):
        return None


def is_bench_report(path: str) -> bool:
    d = _json(path)
    return isinstance(d, dict) and "graft_dir" in d and "per_prompt" in d


def is_answers(path: str) -> bool:
    """Spec-Bench answer records that graft wrote: every line names a `graft-` model."""
    try:
        with open(path, "rb") as f:
            lines = [l for l in f.read(1 << 26).splitlines() if l.strip()]
        recs = [json.loads(l) for l in lines]
    except (OSError, ValueError):
        return False
    return bool(recs) and all(isinstance(r, dict) and str(r.get("model_id", "")).startswith("graft-") for r in recs)


def is_plot(path: str) -> bool:
    """A PNG whose text chunks hold PLOT_TAG (graft bench --plot writes it)."""
    key, value = (x.encode() for x in PLOT_TAG)
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return False
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    at = 8
    while at + 8 <= len(data):
        n, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        if kind == b"tEXt" and data[at + 8:at + 8 + n] == key + b"\0" + value:
            return True
        if kind == b"IDAT":  # text chunks that matter come before the image data
            return False
        at += 12 + n
    return False
