"""Nothing lost, nothing accepted that should not be: every output option of every command against
a file graft did not write, a symbolic link and an unwritable place; every field of graft.json and
every tensor of heads.safetensors tampered with, each giving a correct load or one line."""
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from graft.cli import main
from graft.config import GraftError

FOREIGN = b"notes that are not graft's\n"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(r, pattern):
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output + repr(r.exception)
    lines = [l for l in r.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], r.output


@pytest.fixture(scope="module")
def made(tiny_dirs, tmp_path_factory):
    """A graft folder, its export and a prompts file."""
    d = tmp_path_factory.mktemp("made")
    g, e = d / "g", d / "e"
    r = run("add-heads", tiny_dirs["llama"], "--heads", "medusa", "-k", "2", "--out", g, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert run("export", g, "--out", e).exit_code == 0
    prompts = d / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "the quick", "category": "a"}) + "\n")
    return g, e, prompts


def bench(e, prompts, *extra):
    return run("bench", e, "--prompts", prompts, "--max-new-tokens", "3", "--baselines", "", "--device", "cpu", *extra)


@pytest.mark.parametrize("option", ["--json", "--answers", "--plot"])
def test_bench_outputs_keep_files_graft_did_not_write(option, made, tmp_path):
    """An existing file graft did not write is refused before the bench runs (kept byte for
    byte); --force replaces it; graft's own output is replaced without --force; a symbolic link
    is refused even with --force, and what it points to is untouched."""
    _, e, prompts = made
    target = tmp_path / "out.x"
    target.write_bytes(FOREIGN)
    refused(bench(e, prompts, option, target), "not written by graft")
    assert target.read_bytes() == FOREIGN
    assert bench(e, prompts, option, target, "--force").exit_code == 0
    assert target.read_bytes() != FOREIGN
    assert bench(e, prompts, option, target).exit_code == 0  # graft's own: replaced without --force
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(FOREIGN)
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    refused(bench(e, prompts, option, link, "--force"), "symbolic link")
    assert link.is_symlink() and elsewhere.read_bytes() == FOREIGN
    under = tmp_path / "afile"
    under.write_bytes(FOREIGN)
    refused(bench(e, prompts, option, under / "out"), "is a file, not a folder")
    refused(bench(e, prompts, option, prompts), "different files")


def test_export_never_follows_or_replaces_a_link(made, tmp_path):
    g, _, _ = made
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_bytes(FOREIGN)
    link = tmp_path / "link"
    link.symlink_to(real)
    refused(run("export", g, "--out", link, "--force"), "symbolic link")
    assert link.is_symlink() and (real / "keep.txt").read_bytes() == FOREIGN
    assert not [p for p in os.listdir(tmp_path) if "graft-export" in p]  # nothing left beside it
    afile = tmp_path / "afile"
    afile.write_bytes(FOREIGN)
    r = run("export", g, "--out", afile, "--force")
    assert r.exit_code == 2 and "is a file" in r.output  # click's own check of --out
    assert afile.read_bytes() == FOREIGN


def test_add_heads_and_distill_data_refuse_links(made, tiny_dirs, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    refused(run("add-heads", tiny_dirs["llama"], "--out", link, "--force", "--device", "cpu"), "symbolic link")
    assert os.listdir(real) == []
    data = tmp_path / "data.jsonl"
    data.write_bytes(FOREIGN)
    dlink = tmp_path / "d.jsonl"
    dlink.symlink_to(data)
    refused(run("distill-data", tiny_dirs["llama"], "--prompts", made[2], "--out", dlink, "--force"), "symbolic link")
    assert data.read_bytes() == FOREIGN


def test_a_killed_exports_leftovers_are_cleaned_up(made, tmp_path):
    """A temporary folder of an export whose process is gone (its PID is in the name) goes at the
    next export into the same folder, however young; a live process's stays."""
    g, _, _ = made
    dead = tmp_path / ".graft-export-999999999-abc"
    dead.mkdir()
    live = tmp_path / f".graft-export-{os.getppid()}-abc"
    live.mkdir()
    assert run("export", g, "--out", tmp_path / "x").exit_code == 0
    assert not dead.exists() and live.exists()
    assert all(os.stat(tmp_path / "x" / f).st_mode & 0o044 for f in os.listdir(tmp_path / "x"))  # readable


def test_full_disk_and_read_only_folders_are_one_line(made, tmp_path, monkeypatch):
    """A write that fails (here: safetensors reports a full disk) is one line, and the old export
    stands; a run folder where no lock can be written is one line too."""
    from safetensors import SafetensorError

    import graft.checkpoint as ckpt

    g, _, _ = made
    out = tmp_path / "x"
    assert run("export", g, "--out", out).exit_code == 0
    before = sorted(os.listdir(out))

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(ckpt, "st_save", full)
    refused(run("export", g, "--out", out, "--force"), "free some space")
    assert sorted(os.listdir(out)) == before
    monkeypatch.undo()

    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(ckpt.LOCK_NAME):
            raise OSError(30, "Read-only file system")
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    refused(run("train", g, "--data", made[2], "--max-steps", "1", "--device", "cpu"), "Read-only file system")
    assert run("export", g, "--out", tmp_path / "y").exit_code == 0  # reading needs no lock


def test_a_pickle_named_safetensors_is_one_line(made, tmp_path):
    import pickle

    _, e, prompts = made
    bad = tmp_path / "e"
    shutil.copytree(e, bad)
    (bad / "model.safetensors").write_bytes(pickle.dumps({"weight": [1.0] * 64}))
    refused(run("generate", bad, "--prompt", "x", "--device", "cpu"), "could not load the model")


# -- graft.json and heads.safetensors, tampered with ---------------------------------------------

WRONG = [None, -1, 1.5, "bogus", [], {}, [[1, "x"]], True, float("nan")]  # other types, signs, sizes


def _loads_or_one_line(folder):
    from graft.model import load

    try:
        load(str(folder), device="cpu")
        return "loads"
    except GraftError as e:
        assert "\n" not in str(e), str(e)
        return "refused"


def _fields(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _fields(v, prefix + (k,))
        yield prefix + (k,)


def test_every_graft_json_field_tampered_gives_a_load_or_one_line(made, tmp_path):
    """Each field of graft.json replaced by values of other types and ranges, or removed, and a
    field added: each load succeeds or raises one GraftError line, never another exception."""
    _, e, _ = made
    for src in (e,):  # an export: its graft.json has every part (a tree, a training record)
        folder = tmp_path / src.name
        shutil.copytree(src, folder)
        cfg_file = folder / "graft.json"
        good = json.loads(cfg_file.read_text())
        if src == e:
            good.setdefault("training", {})["rank_accuracy"] = [[0.5, 0.25], [0.3, 0.1]]
        outcomes = {}
        for path in list(_fields(good)):
            for value in WRONG + ["<removed>"]:
                d = json.loads(json.dumps(good))
                node = d
                for k in path[:-1]:
                    node = node[k]
                if value == "<removed>":
                    node.pop(path[-1])
                else:
                    node[path[-1]] = value
                cfg_file.write_text(json.dumps(d))
                outcomes[(path, repr(value))] = _loads_or_one_line(folder)
        # what must be refused is refused
        for key in [(("backbone", "dtype"), "'bogus'"), (("backbone", "hidden_size"), "-1"),
                    (("heads", "num_heads"), "'bogus'"), (("heads", "family"), "None"), (("backbone",), "'<removed>'")]:
            assert outcomes[key] == "refused", key
        if src == e:
            for key in [(("tree",), "[[1, 'x']]"), (("training", "rank_accuracy"), "'bogus'"),
                        (("training", "rank_accuracy"), "[[1, 'x']]")]:
                assert outcomes[key] == "refused", key
        cfg_file.write_text(json.dumps({**good, "extra": 1}))
        assert _loads_or_one_line(folder) in ("loads", "refused")


def test_every_heads_tensor_tampered_gives_a_load_or_one_line(made, tmp_path):
    """Each tensor of heads.safetensors cast to other dtypes, reshaped, renamed, dropped, and the
    file's metadata changed: a correct load or one line (int32 weights, a wrong shape or name,
    another family are refused)."""
    g, _, _ = made
    folder = tmp_path / "g"
    shutil.copytree(g, folder)
    f = folder / "heads.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    good = load_file(str(f))
    for name in good:
        variants = {"int32": {**good, name: good[name].to(torch.int32)},
                    "float64": {**good, name: good[name].double()},
                    "bool": {**good, name: good[name] != 0},
                    "reshaped": {**good, name: good[name].flatten()[None]},
                    "cut": {**good, name: good[name].flatten()[:1]},
                    "renamed": {**{k: v for k, v in good.items() if k != name}, name + "x": good[name]},
                    "dropped": {k: v for k, v in good.items() if k != name}}
        for kind, tensors in variants.items():
            save_file(tensors, str(f), metadata=meta)
            assert _loads_or_one_line(folder) == "refused", (name, kind)
    for m in ({}, {**meta, "family": "eagle"}, {**meta, "format": "pt"}):
        save_file(good, str(f), metadata=m)
        assert _loads_or_one_line(folder) == "refused", m
    save_file(good, str(f), metadata=meta)
    assert _loads_or_one_line(folder) == "loads"


@pytest.mark.parametrize("cmd,option,value", [
    ("distill-data", "--num-samples", "-1"), ("distill-data", "--batch-size", "0"), ("train", "--max-minutes", "-5"),
    ("train", "--max-steps", "0"), ("train", "--lr", "0"), ("train", "--head-decay", "1.5"),
    ("generate", "--max-new-tokens", "0"), ("generate", "--top-p", "0"), ("bench", "--per-category", "-2"),
    ("export", "--tree-size", "-1"), ("generate", "--tree-size", "100000"), ("add-heads", "--draft-vocab", "0"),
    ("train", "--topk", "-1"), ("train", "--topk-weight", "-0.5")])
def test_numeric_options_are_bounded_where_they_are_parsed(cmd, option, value, tmp_path):
    """A count or a bound out of range is click's usage error (exit 2) naming the range, before
    anything loads; the range is in --help."""
    args = {"distill-data": ["x", "--prompts", "p", "--out", tmp_path / "o"], "train": ["g", "--data", "d"],
            "generate": ["g", "--prompt", "x"], "bench": ["g", "--prompts", "p"],
            "export": ["g", "--out", tmp_path / "o"],
            "add-heads": ["x", "--out", tmp_path / "o"]}[cmd]
    r = run(cmd, *args, option, value)
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "range" in lines[0] and option in lines[0], r.output
    assert "x>" in run(cmd, "--help").output or "<=x" in run(cmd, "--help").output
