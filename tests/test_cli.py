"""The command line, through click's CliRunner: output, files, and one-line errors."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from graft.cli import main

import transformers  # noqa: F401  (a hard dependency: its absence is a failure)
transformers.utils.logging.disable_progress_bar()  # CliRunner merges the bars into the output


def run(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def one_line_error(r, pattern):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [l for l in r.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], r.output


def bound_error(r, pattern):
    """A value outside an option's range: click's usage error (exit 2), which names the bound, in
    one line."""
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], r.output


def test_help_teaches():
    r = run("--help")
    for cmd in ("add-heads", "distill-data", "train", "export", "generate", "bench"):
        assert cmd in r.output
    assert "lossless" in r.output
    assert "smollm2-135m" in run("add-heads", "--help").output
    assert "CHANGES" in run("train", "--help").output  # LoRA warning


def test_add_heads_summary_and_files(tiny_dirs, tmp_path):
    out = tmp_path / "g"
    r = run("add-heads", tiny_dirs["llama"], "--heads", "deepseek-mtp", "--num-heads", "3", "--out", out,
            "--device", "cpu")
    assert "deepseek-mtp x 3" in r.output and "trainable params" in r.output and "MiB" in r.output
    cfg = json.loads((out / "graft.json").read_text())
    assert cfg["heads"]["num_heads"] == 3 and cfg["backbone"]["model_type"] == "llama"
    assert cfg["graft_version"]
    assert (out / "heads.safetensors").exists()


def test_add_heads_bad_inputs(tiny_dirs, tmp_path):
    one_line_error(run("add-heads", tmp_path / "missing", "--out", tmp_path / "o", ok=False), "does not exist")
    r = run("add-heads", tiny_dirs["llama"], "--heads", "hydra", "--out", tmp_path / "o", ok=False)
    bound_error(r, "hydra")  # click's own choice error
    r = run("add-heads", tiny_dirs["llama"], "--num-heads", "9", "--out", tmp_path / "o", ok=False)
    bound_error(r, "1<=x<=8")  # the bound, where click parses it
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    one_line_error(run("add-heads", tiny_dirs["llama"], "--out", full, ok=False), "--force")
    run("add-heads", tiny_dirs["llama"], "--out", full, "--force", "--device", "cpu")


@pytest.mark.parametrize("mt", ["llama", "gemma3"])
def test_export_generate_matches_plain_greedy(mt, tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g, e = tmp_path / "g", tmp_path / "e"
    run("add-heads", tiny_dirs[mt], "--heads", "medusa", "-k", "2", "--out", g, "--device", "cpu")
    run("export", g, "--out", e)
    one_line_error(run("export", g, "--out", e, ok=False), "not empty")
    run("export", g, "--out", e, "--force")
    # the export is a plain HF folder too
    hf = AutoModelForCausalLM.from_pretrained(e)
    tok = AutoTokenizer.from_pretrained(e)
    ids = tok.apply_chat_template([{"role": "user", "content": "the quick"}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=0)[0, len(ids):]
    r = run("generate", e, "--prompt", "the quick", "--max-new-tokens", "20", "--stats", "--device", "cpu",
            "--tree", "calibrated")
    assert r.stdout.strip() == tok.decode(ref, skip_special_tokens=True).strip()
    assert "tokens/step" in r.output and "draft tree: 24 nodes (calibrated)" in r.output
    r = run("generate", e, "--prompt", "the quick", "--max-new-tokens", "20", "--engine", "static", "--device", "cpu",
            "--tree", "calibrated")
    assert r.stdout.strip() == tok.decode(ref, skip_special_tokens=True).strip()
    r = run("generate", e, "--prompt", "the quick", "--max-new-tokens", "20", "--stats", "--device", "cpu")
    assert r.stdout.strip() == tok.decode(ref, skip_special_tokens=True).strip()
    assert "draft tree: 0 nodes (untrained heads" in r.output
    one_line_error(run("generate", e, "--prompt", "x", "--engine", "graph", "--device", "cpu", ok=False), "CUDA")
    bound_error(run("generate", e, "--prompt", "x", "--temperature", "-1", ok=False), "x>=0")
    one_line_error(run("generate", tmp_path, "--prompt", "x", ok=False), "graft.json")
    # sampling runs and is reproducible with a seed
    a = run("generate", e, "--prompt", "hello", "--temperature", "1", "--seed", "3", "--max-new-tokens", "8")
    b = run("generate", e, "--prompt", "hello", "--temperature", "1", "--seed", "3", "--max-new-tokens", "8")
    assert a.output == b.output


def test_export_refuses_a_truncated_weights_file(tiny_dirs, tmp_path):
    g, e = tmp_path / "g", tmp_path / "e"
    run("add-heads", tiny_dirs["gpt2"], "--heads", "blockwise", "-k", "2", "--out", g, "--device", "cpu")
    run("export", g, "--out", e)
    f = e / "heads.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    one_line_error(run("generate", e, "--prompt", "x", ok=False), "corrupt")


def test_distill_data_resumes(tiny_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    # longest first: batches go shortest first, records must still follow the prompts' order
    texts = [f"say {i}" + " again" * (5 - i) for i in range(5)]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "d.jsonl"
    run("distill-data", tiny_dirs["llama"], "--prompts", prompts, "--out", out, "--num-samples", "3",
        "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu")
    assert len(out.read_text().splitlines()) == 3
    with open(out, "a") as f:
        f.write('{"messages": [{"role": "us')  # a torn line from a killed run
    run("distill-data", tiny_dirs["llama"], "--prompts", prompts, "--out", out, "--max-new-tokens", "6",
        "--batch-size", "2", "--device", "cpu")
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in recs] == texts
    assert recs[0]["messages"][-1]["role"] == "assistant"
    # several sampled answers per prompt, side by side in the prompts' order; a torn one is written again
    many = tmp_path / "many.jsonl"
    common = ["--prompts", prompts, "--out", many, "--num-samples", "3", "--answers", "3", "--temperature", "1",
              "--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu"]
    run("distill-data", tiny_dirs["llama"], *common)
    lines = many.read_text().splitlines()
    many.write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])
    run("distill-data", tiny_dirs["llama"], *common)
    recs = [json.loads(l) for l in many.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in recs] == [t for t in texts[:3] for _ in range(3)]
    assert recs[:4] == [json.loads(l) for l in lines[:4]]
    assert len({r["messages"][-1]["content"] for r in recs[:3]}) > 1  # sampled: not three copies
    one_line_error(run("distill-data", tiny_dirs["llama"], "--prompts", prompts, "--out", tmp_path / "g.jsonl",
                       "--answers", "2", ok=False), "--temperature")
    # a multi-turn record: the earlier turns stay as context, the backbone answers the last user turn
    turns = [{"role": "user", "content": "say 1"}, {"role": "assistant", "content": "one"},
             {"role": "user", "content": "say 2"}, {"role": "assistant", "content": "an answer to replace"}]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": turns}) + "\n")
    for _ in range(2):  # the second run finds the record done
        run("distill-data", tiny_dirs["llama"], "--prompts", chat, "--out", tmp_path / "c.jsonl",
            "--max-new-tokens", "4", "--device", "cpu")
    recs = [json.loads(l) for l in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["messages"][:3] == turns[:3] and recs[0]["messages"][3]["role"] == "assistant"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"nothing": 1}) + "\n")
    one_line_error(run("distill-data", tiny_dirs["llama"], "--prompts", bad, "--out", tmp_path / "x.jsonl",
                       ok=False), "no `prompt`")
    bad.write_text(json.dumps({"prompt": 3}) + "\n")
    one_line_error(run("distill-data", tiny_dirs["llama"], "--prompts", bad, "--out", tmp_path / "x.jsonl",
                       ok=False), "not text")
    # a file of one line and no newline that is not ours is not taken for a torn record: it stays
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    one_line_error(run("distill-data", tiny_dirs["llama"], "--prompts", prompts, "--out", mine, ok=False),
                   "not distill-data's output")
    assert mine.read_text() == "my notes"


def test_train_cli_and_recipe(tiny_dirs, tiny_data, tmp_path):
    g = tmp_path / "g"
    run("add-heads", tiny_dirs["llama"], "--heads", "blockwise", "-k", "2", "--out", g, "--device", "cpu")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  seq_len: 16\n  batch_size: 4\n  max_steps: 4\n  warmup: 1\n")
    r = run("train", g, "--data", tiny_data, "--config", recipe, "--device", "cpu")
    assert "done: 4 steps" in r.output
    one_line_error(run("train", g, "--data", tiny_data, "--seq-len", "3", ok=False), "too short")
    one_line_error(run("train", tmp_path, "--data", tiny_data, ok=False), "graft.json")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    one_line_error(run("train", g, "--data", empty, ok=False), "empty")
    for rec, says in (({"text": 5}, "not text"), ({"messages": [1, 2]}, "`messages`"),
                      ({"prompt": "a", "response": ["b"]}, "not text")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(rec) + "\n")
        one_line_error(run("train", g, "--data", bad, ok=False), says)


def test_bench_report_and_bad_prompts(tiny_dirs, tmp_path):
    g, e = tmp_path / "g", tmp_path / "e"
    run("add-heads", tiny_dirs["llama"], "--heads", "medusa", "-k", "2", "--out", g, "--device", "cpu")
    run("export", g, "--out", e)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n"
                               for p, c in [("the quick", "a"), ("hello world", "b"), ("to be", "a")]))
    rep = tmp_path / "r.json"
    r = run("bench", e, "--prompts", prompts, "--max-new-tokens", "12", "--baselines", "eager,nodraft",
            "--json", rep, "--device", "cpu")
    assert "tau" in r.output and "speedup" in r.output
    d = json.loads(rep.read_text())
    assert d["identical_rate"] == 1.0  # float32 on CPU: token for token
    assert d["tau"] >= 1.0 and set(d["speedup"]) == {"eager", "nodraft"}
    assert set(d["by_category"]) == {"a", "b"} and len(d["per_prompt"]) == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(run("bench", e, "--prompts", empty, ok=False), "holds no prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    one_line_error(run("bench", e, "--prompts", bad, ok=False), "`prompt`")
    bad.write_text('{oops\n')
    one_line_error(run("bench", e, "--prompts", bad, ok=False), "not valid JSON")
    bound_error(run("bench", e, "--prompts", prompts, "--limit", "0", ok=False), "x>=1")


def test_bench_times_the_loop_without_drafts_with_a_cache_of_its_own(tiny_dirs, tmp_path, monkeypatch):
    """The no-draft baseline decodes with the cache it would have alone: the fixed-shape steps
    read their cache in buckets of an eighth of it, so one grown for a large draft tree would slow the baseline
    and flatter graft's speedup."""
    from graft.speculative import SpeculativeDecoder

    sizes, real = [], SpeculativeDecoder._buffers

    def spy(self, engine, need, drafting):
        out = real(self, engine, need, drafting)
        sizes.append((drafting, out[0].max_len))
        return out

    monkeypatch.setattr(SpeculativeDecoder, "_buffers", spy)
    g = tmp_path / "g"
    run("add-heads", tiny_dirs["llama"], "--heads", "medusa", "-k", "3", "--out", g, "--device", "cpu")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "the quick", "category": "a"}) + "\n")
    run("bench", g, "--prompts", prompts, "--max-new-tokens", "12", "--baselines", "nodraft", "--engine", "static",
        "--tree-size", "250", "--device", "cpu")  # 251 nodes: past 256 slots
    assert {n for d, n in sizes if d} == {512} and {n for d, n in sizes if not d} == {256}


def test_choices_come_from_the_registries():
    """Every registered family and format resolves to what it names, and the CLI offers exactly
    the registries' entries; `graft --help` imports no torch."""
    import subprocess
    import sys

    from graft import registry
    from graft.cli import add_heads_cmd, bench_cmd, export_cmd, generate_cmd

    for name in registry.FAMILIES:
        assert registry.resolve(registry.FAMILIES, name, "head family").family == name
    for name in registry.FORMATS:
        assert registry.resolve(registry.FORMATS, name, "format").name == name

    def choices(cmd, name):
        (param,) = [p for p in cmd.params if p.name == name]
        return tuple(param.type.choices)

    assert choices(add_heads_cmd, "family") == tuple(registry.FAMILIES)
    assert choices(export_cmd, "fmt") == tuple(registry.FORMATS)
    for cmd in (generate_cmd, bench_cmd):
        assert choices(cmd, "engine") == registry.ENGINES
        assert choices(cmd, "tree") == registry.TREES
    code = "import sys, graft.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_option_lists_match_the_library():
    from graft.backbone import DECODE_DTYPES, DTYPES
    from graft.cli import DECODE_DTYPE_CHOICES, DTYPE_CHOICES

    assert DTYPE_CHOICES == ["auto"] + list(DTYPES)
    assert DECODE_DTYPE_CHOICES == list(DECODE_DTYPES)


def test_4bit_options_on_a_dense_backbone_are_one_line(tiny_dirs, tmp_path):
    g = tmp_path / "g"
    run("add-heads", tiny_dirs["llama"], "--heads", "medusa", "--out", g, "--device", "cpu")
    one_line_error(run("generate", g, "-p", "hi", "--decode-dtype", "bfloat16", "--device", "cpu", ok=False),
                   "applies to 4-bit backbones")
    one_line_error(run("export", g, "--out", tmp_path / "e", "--keep-4bit", ok=False), "--keep-4bit")
    one_line_error(run("train", g, "--data", tmp_path / "none.jsonl", "--shard-backbone", "--device", "cpu", ok=False),
                   "several processes")


def test_distill_batches_fit_their_widest_prompt():
    from graft.data import first_batch

    room = lambda width: 20 / width  # noqa: E731  (rows a width allows)
    assert first_batch([1, 2, 3, 10, 10], room) == 3  # a fourth prompt of 10 tokens would allow 2 rows
    assert first_batch([30, 40], room) == 1  # one prompt even where none fits: its own error follows
    assert first_batch([1, 1, 1], lambda width: 8) == 3


def test_distill_halves_a_batch_that_runs_out_of_memory(tiny_dirs, monkeypatch, capsys):
    import io

    from graft.backbone import load_backbone
    from graft.config import GraftError
    from graft.data import _answer

    bb = load_backbone(tiny_dirs["llama"], device="cpu")
    convs = [[{"role": "user", "content": f"say {i}" + " again" * (i % 3)}] for i in range(7)]
    one = io.StringIO()
    _answer(bb, convs, 0, one, 5, 0.0, 1, progress=False)
    generate = bb.hf.generate
    sizes = []

    def small_memory(input_ids, **kw):
        sizes.append(len(input_ids))
        if len(input_ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
        return generate(input_ids=input_ids, **kw)

    monkeypatch.setattr(bb.hf, "generate", small_memory)
    halved = io.StringIO()
    _answer(bb, convs, 0, halved, 5, 0.0, 8, progress=False)
    assert halved.getvalue() == one.getvalue()  # every answer, in the prompts' order, once
    assert sizes[:3] == [7, 3, 1] and max(sizes[3:]) == 1  # halved until it fits, and never larger again
    assert "out of device memory at 7 prompts a batch" in capsys.readouterr().out
    monkeypatch.setattr(bb.hf, "generate", lambda **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(GraftError, match="one prompt of .* tokens .*--max-new-tokens 5: lower it"):
        _answer(bb, convs[:1], 0, io.StringIO(), 5, 0.0, 4, progress=False)


def test_distill_stops_at_its_time_budget_and_continues(tiny_dirs, tmp_path, monkeypatch):
    import io
    from types import SimpleNamespace

    import graft.data
    from graft.backbone import load_backbone
    from graft.data import _answer

    bb = load_backbone(tiny_dirs["llama"], device="cpu")
    # prompt 1 is the shortest, so the first batch answers prompts 1 and 3, not 0 and 1
    convs = [[{"role": "user", "content": "say" + " again" * n}] for n in (3, 0, 4, 1, 2, 5, 6)]
    whole = io.StringIO()
    assert _answer(bb, convs, 0, whole, 5, 0.0, 2, progress=False) == 7
    clock = [0.0]
    generate = bb.hf.generate

    def slow(**kw):  # each batch takes a minute
        clock[0] += 60
        return generate(**kw)

    monkeypatch.setattr(bb.hf, "generate", slow)
    monkeypatch.setattr(graft.data, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    part = io.StringIO()
    # two batches start before the deadline (prompts 1 and 3, then 4 and 0); prompt 2 is unanswered, so
    # prompts 0 and 1 are written and 3 and 4 dropped
    assert _answer(bb, convs, 0, part, 5, 0.0, 2, progress=False, deadline=90) == 2
    assert part.getvalue().splitlines() == whole.getvalue().splitlines()[:2]
    assert _answer(bb, convs, 2, part, 5, 0.0, 2, progress=False) == 7
    assert part.getvalue() == whole.getvalue()
    monkeypatch.undo()
    prompts, out = tmp_path / "p.jsonl", tmp_path / "d.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(3)))
    args = ["distill-data", tiny_dirs["llama"], "--prompts", prompts, "--out", out, "--max-new-tokens", "4",
            "--device", "cpu"]
    r = run(*args, "--max-minutes", "1e-9")
    assert "holds 0 of 3 records; the same command continues" in r.output and not out.read_text()
    assert "wrote 3 records" in run(*args).output and len(out.read_text().splitlines()) == 3


def test_distill_data_never_overwrites_what_it_did_not_write(tiny_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(3)))
    common = ("--max-new-tokens", "4", "--batch-size", "3", "--device", "cpu")
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n\nnot JSON at all\n")
    one_line_error(run("distill-data", tiny_dirs["llama"], "--prompts", prompts, "--out", notes, *common, ok=False),
                   "not distill-data's output")
    assert notes.read_text() == "# my notes\n\nnot JSON at all\n"
    other = tmp_path / "other.jsonl"  # valid chat records, for other prompts: not ours to resume
    other.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": "a"}]}) + "\n" for i in range(5)))
    before = other.read_text()
    one_line_error(run("distill-data", tiny_dirs["llama"], "--prompts", prompts, "--out", other, *common, ok=False),
                   "not distill-data's output")
    assert other.read_text() == before
    one_line_error(run("distill-data", tiny_dirs["llama"], "--prompts", prompts, "--out", prompts, *common, ok=False),
                   "prompts file itself")
    one_line_error(run("distill-data", tiny_dirs["llama"], "--prompts", prompts, "--out", notes / "x.jsonl", *common,
                       ok=False), "under a file")
    run("distill-data", tiny_dirs["llama"], "--prompts", prompts, "--out", other, "--force", *common)
    assert len(other.read_text().splitlines()) == 3  # --force started it over


def test_export_refuses_an_out_that_holds_the_source(tiny_dirs, tmp_path):
    parent = tmp_path / "runs"
    g = parent / "g"
    run("add-heads", tiny_dirs["llama"], "--heads", "medusa", "-k", "2", "--out", g, "--device", "cpu")
    (parent / "keep.txt").write_text("mine")
    one_line_error(run("export", g, "--out", parent, "--force", ok=False), "contains the graft folder")
    assert (g / "graft.json").exists() and (parent / "keep.txt").read_text() == "mine"
    run("export", g, "--out", tmp_path / "e")
    assert oct(os.stat(tmp_path / "e").st_mode & 0o777) != oct(0o700)  # an export is not private
    assert not list(tmp_path.glob(".graft-export-*"))


def test_weights_of_the_same_size_are_not_the_same_backbone(tiny_dirs, tmp_path):
    """The backbone's identity hashes its weights: other weights of the same size are refused,
    unless the user says --no-verify-backbone."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "bb"
    shutil.copytree(tiny_dirs["llama"], src)
    g = tmp_path / "g"
    run("add-heads", src, "--heads", "medusa", "-k", "2", "--out", g, "--device", "cpu")
    w = src / "model.safetensors"
    t = load_file(w)
    k = next(iter(t))
    t[k] = t[k] + 0.01
    save_file(t, w, metadata={"format": "pt"})
    one_line_error(run("generate", g, "--prompt", "hello", "--max-new-tokens", "2", ok=False), "were made for")
    run("generate", g, "--prompt", "hello", "--max-new-tokens", "2", "--no-verify-backbone")
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    one_line_error(run("add-heads", src, "--heads", "medusa", "--out", tmp_path / "g2", "--device", "cpu", ok=False),
                   "no safetensors")


def test_bad_text_and_numbers_are_one_line(tiny_dirs, tmp_path):
    g = tmp_path / "g"
    run("add-heads", tiny_dirs["llama"], "--heads", "medusa", "-k", "2", "--out", g, "--device", "cpu")
    one_line_error(run("generate", g, "--prompt", "x", "--temperature", "nan", ok=False), "finite")
    one_line_error(run("generate", g, "--prompt", "x", "--temperature", "inf", ok=False), "finite")
    one_line_error(run("generate", g, "--prompt", "x", "--stop", "", ok=False), "non-empty")
    afile = tmp_path / "x.txt"
    afile.write_text("x")
    one_line_error(run("generate", afile, "--prompt", "x", ok=False), "is a file")
    one_line_error(run("add-heads", afile, "--out", tmp_path / "o", ok=False), "is a file")
    r = CliRunner().invoke(main, ["generate", str(g), "--prompt", "-"], input=b"\xff\xfe bad")
    one_line_error(r, "UTF-8")


def test_bench_reads_spec_bench_questions_and_writes_answers(tiny_dirs, tmp_path):
    g = tmp_path / "g"
    run("add-heads", tiny_dirs["llama"], "--heads", "medusa", "-k", "2", "--out", g, "--device", "cpu")
    q = tmp_path / "question.jsonl"  # Spec-Bench / MT-Bench layout
    q.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": t}) + "\n" for i, c, t in [
        (81, "writing", ["the quick", "hello world"]), (82, "math", ["to be"]), (83, "writing", ["numbers one"])]))
    ans, rep = tmp_path / "answers.jsonl", tmp_path / "r.json"
    run("bench", g, "--prompts", q, "--turns", "all", "--per-category", "1", "--max-new-tokens", "6",
        "--baselines", "nodraft", "--answers", ans, "--json", rep, "--device", "cpu")
    recs = [json.loads(l) for l in ans.read_text().splitlines()]
    assert [r["question_id"] for r in recs] == [81, 82]  # the first question of each category
    c = recs[0]["choices"][0]
    assert len(c["turns"]) == 2 and all(isinstance(t, str) for t in c["turns"])
    steps = c["accept_lengths"][0]  # tokens per verification step; the prefill's token comes before them
    assert len(steps) == c["decoding_steps"][0] and all(n >= 1 for n in steps)
    assert sum(steps) >= c["new_tokens"][0] - 1 > sum(steps[:-1])
    assert len(json.loads(rep.read_text())["per_prompt"]) == 3  # one row per turn
    run("bench", g, "--prompts", q, "--max-new-tokens", "4", "--baselines", "", "--answers", ans, "--device", "cpu")
    assert all(len(json.loads(l)["choices"][0]["turns"]) == 1 for l in ans.read_text().splitlines())
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n\xff\xfe\n')
    one_line_error(run("bench", g, "--prompts", bad, ok=False), "line 2 is not UTF-8")


def test_graft_has_no_import_circle():
    """No module of graft imports, at the top or inside a function, one that imports it back
    (through any chain): the layers in docs/development.md hold."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "graft"

    def name(path):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    graph = {}
    for path in root.rglob("*.py"):
        mod = name(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import x`: module x if there is one, else a name of the package
                names = [target] if node.module else [target + "." + a.name for a in node.names] + [target]
                edges.update(n for n in names if n != mod)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("graft.") and a.name != mod)
        graph[mod] = edges
    graph = {m: {e for e in es if e in graph} for m, es in graph.items()}
    for m, es in graph.items():  # `from . import x` of a module x: not the package too
        es.difference_update({e.rsplit(".", 1)[0] for e in es if e.rsplit(".", 1)[0] in es and e != m})

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert not circles, f"modules on an import circle: {circles}"
