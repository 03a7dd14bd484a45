"""Data: records from files or the hub -> chat text -> packed token blocks; and self-distillation
data, where the backbone answers the prompts itself.
"""
from __future__ import annotations

import json
import os
import time

import torch

from .config import GraftError, atomic_write_bytes
from .distributed import setup as dist_setup
from .modeling import attention_backends

EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def load_records(source: str):
    """A local JSONL/JSON/Parquet/CSV/text file or folder, or a hub dataset name -> datasets.Dataset."""
    import datasets

    datasets.disable_progress_bars()
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source)
                       if os.path.splitext(f)[1] in EXTENSIONS)
        if not files:
            raise GraftError(f"{source} holds no .jsonl/.json/.parquet/.csv/.txt files: point --data at one")
        kinds = {EXTENSIONS[os.path.splitext(f)[1]] for f in files}
        if len(kinds) > 1:
            raise GraftError(f"{source} mixes file types ({', '.join(sorted(kinds))}): keep one kind per folder")
        kind = kinds.pop()
    elif os.path.isfile(source):
        ext = os.path.splitext(source)[1]
        if ext not in EXTENSIONS:
            raise GraftError(f"{source}: unknown data file type {ext!r}: use .jsonl, .json, .parquet, .csv or .txt")
        if os.path.getsize(source) == 0:
            raise GraftError(f"{source} is empty: give a file with records")
        files, kind = [source], EXTENSIONS[ext]
    elif source.startswith((".", "/", "~")) or os.path.splitext(source)[1] in EXTENSIONS:
        raise GraftError(f"data file {source} does not exist: check the path")
    else:
        try:
            return datasets.load_dataset(source, split="train")
        except Exception as e:  # the hub raises many types; all mean "could not get it"
            raise GraftError(f"could not load dataset {source!r} from the hub ({e.__class__.__name__}): "
                             "give a local file, or run where the hub is reachable")
    for f in files:
        if f.endswith(".jsonl"):
            for _ in read_jsonl(f):  # only the checks: datasets reads the records
                pass
    try:
        ds = datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as e:  # datasets wraps parse errors in several exception types
        raise GraftError(f"{source} could not be parsed as {kind} ({str(e).splitlines()[0][:120]}): fix the file")
    if len(ds) == 0:
        raise GraftError(f"{source} holds no records: give a file with records")
    return ds


def read_jsonl(path: str):
    """(line number, record) for each non-blank line of a JSONL file; a line that is not UTF-8, not
    JSON or not an object is a one-line error naming the file and the line (datasets' own errors
    name neither)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise GraftError(f"{path} line {n} is not UTF-8 text: re-encode the file as UTF-8")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise GraftError(f"{path} line {n} is not valid JSON ({e.msg}): fix or remove it")
            if not isinstance(rec, dict):
                raise GraftError(f"{path} line {n} is not a JSON object: each line needs one record")
            yield n, rec


def record_text(rec: dict, tokenizer) -> str:
    """One record -> training text. `messages` (chat), `prompt` + `response`, or `text`."""
    return record_parts(rec, tokenizer)[0]


def record_parts(rec: dict, tokenizer) -> tuple[str, str]:
    """One record -> (training text, the part of it before the answer). The answer is a chat
    record's last turn when the assistant speaks it, or a record's `response`; a `text` record is
    all answer (""), a chat record that ends on another role's turn none of it (the whole text)."""
    chat = getattr(tokenizer, "chat_template", None)
    if rec.get("messages"):
        msgs = _messages(rec["messages"])
        answered = len(msgs) > 1 and msgs[-1]["role"] == "assistant"
        if chat:
            text = apply_chat(tokenizer, msgs, tokenize=False)
            if not answered:
                return text, text
            return text, apply_chat(tokenizer, msgs[:-1], tokenize=False, add_generation_prompt=True)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
        return text, text[: len(text) - len(msgs[-1]["content"])] if answered else text
    if rec.get("prompt") is not None and rec.get("response") is not None:
        msgs = [{"role": "user", "content": _text(rec, "prompt")},
                {"role": "assistant", "content": _text(rec, "response")}]
        if chat:
            return (apply_chat(tokenizer, msgs, tokenize=False),
                    apply_chat(tokenizer, msgs[:1], tokenize=False, add_generation_prompt=True))
        return msgs[0]["content"] + msgs[1]["content"], msgs[0]["content"]
    if rec.get("text") is not None:
        return _text(rec, "text"), ""
    raise GraftError(f"a record has none of the fields `messages`, `prompt`+`response` or `text` "
                     f"(it has {', '.join(sorted(rec)) or 'nothing'}): rename the fields")


def _text(rec: dict, key: str) -> str:
    if not isinstance(rec[key], str):
        raise GraftError(f"a record's `{key}` is {type(rec[key]).__name__}, not text: give it as a string")
    return rec[key]


def _messages(msgs) -> list[dict]:
    """`messages` as chat templates take them: a list of {"role": str, "content": str}."""
    if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        raise GraftError('a record\'s `messages` is not a list of {"role": ..., "content": ...} with text in both: '
                         "fix the record")
    return msgs


def apply_chat(tokenizer, msgs: list[dict], **kw):
    """The tokenizer's chat template over `msgs`; a template that refuses them (Gemma's, for turns
    that do not alternate) is a one-line error."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        return tokenizer.apply_chat_template(msgs, **kw)
    except (TemplateError, ValueError, TypeError, KeyError) as e:  # raise_exception() in a template is a TemplateError
        raise GraftError(f"the tokenizer's chat template refused a conversation ({str(e)[:160]}): fix the "
                         "record's messages") from None


def pack(ds, tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize every record, join them (each ends with EOS unless its text already does), and cut
    into (N, seq_len) blocks; the remainder is dropped. Also where the answers are: a bool (N,
    seq_len), True at the tokens of each record's answer and the EOS after it (`record_parts`).
    Decoding drafts answers, never the prompts or the chat template around them, so evaluation
    counts these positions; data without answers (a chat record ending on a user turn) counts whole."""
    eos = tokenizer.eos_token_id
    stream, answer = [], []
    for rec in ds:
        text, head = record_parts(rec, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_head = 0  # tokens before the answer: the prompt's own tokens, as far as they agree with the text's
        if head:
            for a, b in zip(ids, tokenizer(head, add_special_tokens=False)["input_ids"]):
                if a != b:
                    break
                n_head += 1
        stream.extend(ids)
        answer.extend([False] * n_head + [True] * (len(ids) - n_head))
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(eos)
            answer.append(n_head < len(ids))
    n = len(stream) // seq_len
    if n == 0:
        raise GraftError(f"the data holds {len(stream)} tokens, fewer than one sequence of --seq-len {seq_len}: "
                         "add data or lower --seq-len")
    answer = torch.tensor(answer[: n * seq_len], dtype=torch.bool).view(n, seq_len)
    if not answer.any():
        answer[:] = True
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len), answer


def split_blocks(n: int, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices of the training blocks and of a fixed random slice held out for evaluation (at
    least one block when there are two)."""
    n_eval = max(1, int(round(n * eval_fraction))) if n >= 2 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_eval:], perm[:n_eval]


def batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """The sequence indices of micro-batch `step`: an endless stream of per-epoch permutations,
    a pure function of (step, seed) so a resumed run sees exactly the same data."""
    out = []
    for p in range(step * batch, step * batch + batch):
        epoch, i = divmod(p, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perm[i]))
    return torch.tensor(out)


def prompt_of(rec: dict) -> list[dict]:
    """The conversation the backbone answers: a record's `messages` up to its last turn that is not
    the assistant's (earlier assistant turns stay as context), or its prompt text as one user turn."""
    if rec.get("messages"):
        msgs = _messages(rec["messages"])
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if msgs:
            return msgs
    for key in ("prompt", "instruction", "question", "text"):
        if rec.get(key):
            return [{"role": "user", "content": _text(rec, key)}]
    raise GraftError(f"a prompt record has no `prompt`, `messages` or `text` field (it has {', '.join(sorted(rec))}): "
                     "rename the field")


def _done_records(out: str, convs: list, force: bool) -> int:
    """The records an earlier run of the same prompts wrote to `out` (a torn last line, from a
    run killed mid-write, is dropped). A file that is anything else is never touched without
    `force`, which starts it over."""
    if not os.path.exists(out) or os.path.getsize(out) == 0:
        return 0
    if not os.path.isfile(out):
        raise GraftError(f"--out {out} is not a file: choose a file path")
    if force:
        os.truncate(out, 0)
        return 0
    with open(out, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    good, size = 0, 0
    for n, line in enumerate(lines):
        last = n == len(lines) - 1 or not any(x.strip() for x in lines[n + 1:])
        try:
            rec = json.loads(line)
            ours = (isinstance(rec, dict) and isinstance(rec.get("messages"), list) and good < len(convs)
                    and rec["messages"][:-1] == convs[good] and rec["messages"][-1].get("role") == "assistant")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            if last and not line.strip():
                break
            if last and good < len(convs):  # torn by a kill mid-write: written again, if it is one of ours
                head = json.dumps({"messages": convs[good]})[:-2].encode()  # up to the answer
                if line.startswith(head) or head.startswith(line):
                    break
            ours = False
        if not ours:
            raise GraftError(f"--out {out} exists and is not distill-data's output for these prompts (line {n + 1}): "
                             "choose another --out, or pass --force to start it over")
        good += 1
        size += len(line) + 1
    if size != len(data):
        os.truncate(out, size)
    return good


def distill(model: str, prompts: str, out: str, *, max_new_tokens=256, temperature=0.0, num_samples=None,
            answers=1, batch_size=None, seed=0, dtype="auto", device="auto", load_in_4bit=False,
            trust_remote_code=False, force=False, max_minutes=None) -> tuple[int, int]:
    """Let the backbone answer every prompt (`answers` times, sampled, each a record); append chat
    records to `out`. A re-run with the same prompts continues where a stopped one left off;
    `force` starts `out` over. `max_minutes`: start no batch after that long (the answers so far
    are kept, in the prompts' order, for a re-run to continue). Returns the records in `out` and
    the records the prompts ask for.

    Raises:
        GraftError: bad options or prompts, or an `out` that holds something else.
    """
    from .backbone import load_backbone
    from .checkpoint import is_graft_dir, load_config

    if max_new_tokens < 1 or batch_size is not None and batch_size < 1:
        raise GraftError("--max-new-tokens and --batch-size must be at least 1")
    if not 0 <= temperature < float("inf"):
        raise GraftError(f"--temperature must be a finite number >= 0, got {temperature}")
    if answers < 1 or answers > 1 and temperature == 0:
        raise GraftError(f"--answers {answers} needs sampled answers: give --temperature above 0 (greedy answers to "
                         "one prompt are all the same)")
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(prompts):
        raise GraftError("--out is the prompts file itself: choose another --out")
    ds = load_records(prompts)
    if num_samples is not None:
        ds = ds.select(range(min(num_samples, len(ds))))
    convs = [c for c in map(prompt_of, ds) for _ in range(answers)]  # a prompt's answers side by side
    from .files import refuse_link

    refuse_link(out, "--out")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.exists(parent) and not os.path.isdir(parent) or not os.path.isdir(parent) and _file_above(parent):
        raise GraftError(f"--out {out} lies under a file, not a folder: choose another path")
    dd = dist_setup()
    done = dd.gather_objects(_done_records(out, convs, force) if dd.main else None)[0]
    if done >= len(convs):
        return done, len(convs)
    deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
    if is_graft_dir(model):
        ident = load_config(model).backbone
        model = os.path.join(model, "") if ident.source == "." else ident.source
    bb = load_backbone(model, dtype=dtype, device=dd.device(device), load_in_4bit=load_in_4bit,
                       trust_remote_code=trust_remote_code)
    torch.manual_seed(seed + dd.rank)
    # Several processes (accelerate launch / torchrun): each answers every world-th remaining
    # prompt into a part file of its own (resumable like `out`); rank 0 then interleaves the
    # parts into `out` in the prompts' order, in one rename.
    if dd.world == 1:
        target, sub_convs, sub_done = out, convs, done
    else:
        target = f"{out}.part-{done}-{dd.rank}of{dd.world}"
        sub_convs = [convs[i] for i in range(done + dd.rank, len(convs), dd.world)]
        sub_done = _done_records(target, sub_convs, False)
    try:
        os.makedirs(parent, exist_ok=True)
        f = open(target, "a")
    except OSError as e:
        raise GraftError(f"cannot write --out {out} ({e.strerror}): choose a writable path")
    with f:
        written = _answer(bb, sub_convs, sub_done, f, max_new_tokens, temperature, batch_size, progress=dd.main,
                          deadline=deadline)
    if dd.world == 1:
        return written, len(convs)
    dd.barrier()
    merged = []
    if dd.main:
        parts = [f"{out}.part-{done}-{r}of{dd.world}" for r in range(dd.world)]
        lines = [open(p).read().splitlines() for p in parts]
        for i in range(done, len(convs)):  # in the prompts' order, up to the first one unanswered
            part, row = lines[(i - done) % dd.world], (i - done) // dd.world
            if row >= len(part):
                break
            merged.append(part[row])
        old = open(out).read() if os.path.exists(out) else ""
        atomic_write_bytes(out, (old + "".join(line + "\n" for line in merged)).encode())
        for p in parts:
            os.unlink(p)
    dd.barrier()
    return dd.gather_objects(done + len(merged) if dd.main else None)[0], len(convs)


DISTILL_BATCH = {"cuda": 512, "cpu": 16}  # prompts answered together at most, by default (--batch-size)


def prompt_bytes(bb, width: int, new: int) -> int:
    """A generous estimate of the device memory one prompt of `width` tokens takes while
    transformers' `generate` answers it with up to `new` tokens: its KV cache, doubled (the
    dynamic cache grows by a copy each step and the allocator cannot always reuse the old
    blocks), one layer's activations over the prompt, the attention mask and the last logits."""
    cfg = bb.config
    item = torch.finfo(bb.dtype).bits // 8
    inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    kv = 2 * len(bb.layers) * bb.n_kv_heads * bb.head_dim * item * (width + new)
    return 2 * kv + width * (4 * cfg.hidden_size + 3 * inter) * item + width * width + 8 * bb.vocab_size


def first_batch(widths: list[int], rows) -> int:
    """How many of the prompts sorted by length (`widths`, ascending) the next batch takes: as
    many as `rows(width)` allows for the widest of them, at least one."""
    n = 1
    while n < len(widths) and n + 1 <= rows(widths[n]):
        n += 1
    return n


def _answer(bb, convs, done, f, max_new_tokens, temperature, batch_size, progress=True, deadline=None) -> int:
    """The backbone's answers to convs[done:], appended to the open file `f` as chat records;
    returns how many records `f` holds. Past `deadline` (time.monotonic()) no batch starts: the
    window's answers that follow the records in order are written, the rest dropped.

    `batch_size` None: on CUDA as many prompts at once as the free memory holds (prompt_bytes),
    at most DISTILL_BATCH; on CPU DISTILL_BATCH's. A batch that runs out of device memory is
    halved and tried again, and no later batch is larger."""
    from tqdm.auto import tqdm

    tok, hf = bb.tokenizer, bb.hf
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kw = dict(do_sample=True, temperature=temperature, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    cuda = bb.device.type == "cuda"
    cap = batch_size or DISTILL_BATCH["cuda" if cuda else "cpu"]
    budget = 0.6 * torch.cuda.mem_get_info(bb.device)[0] if cuda and batch_size is None else None
    window = 4 * cap

    def rows(width: int) -> float:
        return min(cap, budget / prompt_bytes(bb, width, max_new_tokens)) if budget else cap

    bar = tqdm(total=len(convs), initial=done, desc="distill", unit="prompt", disable=not progress)
    held = done  # records in `f`
    # Within a window of prompts, batches take them in order of length, so they pad little;
    # the window is written in the prompts' order, so a resumed run skips whole records.
    for w0 in range(done, len(convs), window):
        idx = list(range(w0, min(w0 + window, len(convs))))
        enc = {i: encode_chat(tok, convs[i]) for i in idx}
        idx.sort(key=lambda i: len(enc[i]))
        widths = [len(enc[i]) for i in idx]
        answers = {}
        while len(answers) < len(idx) and not (deadline and time.monotonic() >= deadline):
            at = len(answers)
            batch = idx[at:at + first_batch(widths[at:], rows)]
            width = widths[at + len(batch) - 1]
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, i in enumerate(batch):  # left padding
                ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
                attn[r, width - len(enc[i]):] = 1
            try:
                with torch.inference_mode(), attention_backends(bb.device, static=False):
                    gen = hf.generate(input_ids=ids.to(bb.device), attention_mask=attn.to(bb.device),
                                      max_new_tokens=max_new_tokens, pad_token_id=pad, **kw)
            except torch.OutOfMemoryError:
                gen = None
            if gen is None:  # outside the handler: its traceback holds the failed batch's tensors
                if len(batch) == 1:
                    raise GraftError(f"out of device memory answering one prompt of {width} tokens with "
                                     f"--max-new-tokens {max_new_tokens}: lower it, or use --load-in-4bit")
                cap = len(batch) // 2
                if cuda:
                    torch.cuda.empty_cache()
                bar.write(f"distill: out of device memory at {len(batch)} prompts a batch; going on with "
                          f"at most {cap}")
                continue
            for r, i in enumerate(batch):
                answers[i] = tok.decode(gen[r, width:], skip_special_tokens=True)
            bar.update(len(batch))
            bar.set_postfix(batch=len(batch))
        n = 0  # the window's answers that follow the records in order
        while n < len(idx) and w0 + n in answers:
            n += 1
        if n:
            f.write("".join(json.dumps({"messages": convs[i] + [{"role": "assistant", "content": answers[i]}]})
                            + "\n" for i in range(w0, w0 + n)))
            f.flush()
        held = w0 + n
        if n < len(idx):  # out of time
            break
    bar.close()
    return held


def _file_above(path: str) -> bool:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return bool(path) and not os.path.isdir(path)


def encode_chat(tok, msgs: list[dict], chat: bool = True) -> list[int]:
    """The prompt ids the model answers: the messages through the tokenizer's chat template with
    the assistant's turn opened, or their plain text where there is no template (or not `chat`)."""
    if chat and getattr(tok, "chat_template", None):
        ids = apply_chat(tok, msgs, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 may return a BatchEncoding
    return list(tok("\n".join(m["content"] for m in msgs), add_special_tokens=True)["input_ids"])
