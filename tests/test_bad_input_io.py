"""Bad input to model IO, generation, the fused loss, data preparation and the training flags
(issue 18): every bad input is refused with a message naming the argument, flag or file, before
any side effect; for the data-loss cases the files on disk are byte-identical after the failed
call and the previous checkpoint / data directory still loads."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import phi_model.atomic
import phi_model.checkpoint
from phi_model import CheckpointError, PhiConfig, PhiForCausalLM
from phi_model.generate import generate, generate_stream, main as generate_main, sample_next
from phi_model.loss import fused_linear_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from phi_train.config import TrainConfig, parse_args, validate
from phi_train.data import TokenLoader, read_shard, write_shard
from phi_train.prepare_data import main as prepare_main, prepare
from tests.conftest import subprocess_env

VOCAB = 64


def _model(seed: int = 0, **kw) -> PhiForCausalLM:
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=32, **kw)
    torch.manual_seed(seed)
    return PhiForCausalLM(cfg).eval()


def _snapshot(d) -> dict[str, bytes]:
    """Every file under d (relative path -> bytes), and the names beside d (no temp leftovers)."""
    d = str(d)
    files = {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
             for r, _, fs in os.walk(d) for f in fs}
    files["<siblings>"] = "\n".join(sorted(os.listdir(os.path.dirname(os.path.abspath(d))))).encode()
    return files


def _same_logits(a: PhiForCausalLM, b: PhiForCausalLM) -> bool:
    x = torch.arange(8)[None] % VOCAB
    with torch.no_grad():
        return torch.equal(a(x).logits, b(x).logits)


# ============================================================================ save_pretrained

@pytest.fixture
def saved(tmp_path):
    """A complete checkpoint (with a user's README beside it) in tmp_path/ckpt, and its model."""
    d = tmp_path / "ckpt"
    model = _model(seed=1)
    model.save_pretrained(str(d))
    (d / "README.md").write_text("my notes")
    return d, model


def _assert_untouched(d, before, model):
    assert _snapshot(d) == before, "the failed save changed files on disk"
    assert _same_logits(PhiForCausalLM.from_pretrained(str(d)), model), "the previous checkpoint no longer loads"


def _break_config(model, field, value):
    setattr(model.config, field, value)  # after construction: what a script mutating its config does
    return field


def _mismatched_weights(model):
    model.config.intermediate_size = 128  # the weights stay 64 wide: what would be saved could not load
    return "mlp.fc1.weight"


@pytest.mark.parametrize("breaker", [
    lambda m: _break_config(m, "layer_norm_eps", np.float32(1e-5)),  # the reported case: truncated config.json
    lambda m: _break_config(m, "rope_theta", float("nan")),
    lambda m: _break_config(m, "partial_rotary_factor", np.float64("inf")),
    lambda m: _break_config(m, "bos_token_id", object()),
    _mismatched_weights,
], ids=["numpy-float", "nan", "inf", "object", "weights-vs-config"])
def test_save_validates_before_writing(saved, breaker):
    d, _ = saved
    before = _snapshot(d)
    model = _model(seed=2)
    name = breaker(model)
    with pytest.raises(ValueError, match=name):
        model.save_pretrained(str(d))
    _assert_untouched(d, before, saved[1])


@pytest.mark.parametrize("mode", ["sibling", "sibling-no-exchange", "in-place"])
def test_save_failing_midway_leaves_previous_checkpoint_byte_identical(saved, monkeypatch, mode):
    """The safetensors writer writes half a file and raises (a full disk): the previous
    checkpoint is byte-identical and loads, whichever way the directory is replaced."""
    d, old = saved
    if mode == "sibling-no-exchange":
        monkeypatch.setattr(phi_model.atomic, "_exchange", lambda a, b: False)  # two-rename fallback
    if mode == "in-place":
        monkeypatch.chdir(d)  # the working directory inside the target: files renamed one by one
    before = _snapshot(d)
    real_save_file = phi_model.checkpoint.save_file

    def broken(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(phi_model.checkpoint, "save_file", broken)
    new = _model(seed=3)
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(str(d))
    _assert_untouched(d, before, old)
    # A save that succeeds replaces the weights and config, keeps the user's file, drops stale
    # weight files (which would otherwise be a second, older copy of the model).
    monkeypatch.setattr(phi_model.checkpoint, "save_file", real_save_file)
    torch.save({}, d / "pytorch_model.bin")
    new.save_pretrained(str(d))
    assert sorted(os.listdir(d)) == ["README.md", "config.json", "model.safetensors"]
    assert (d / "README.md").read_text() == "my notes"
    assert _same_logits(PhiForCausalLM.from_pretrained(str(d)), new)
    assert not [n for n in os.listdir(d.parent) if n.startswith(".")], "temporary directories left behind"


def test_save_failing_at_the_swap_and_bad_extra_files(saved, monkeypatch):
    d, old = saved
    before = _snapshot(d)

    def no_swap(a, b):
        raise OSError(5, "I/O error during rename")

    monkeypatch.setattr(phi_model.atomic, "_exchange", no_swap)
    with pytest.raises(OSError, match="I/O error"):
        _model(seed=4).save_pretrained(str(d))
    _assert_untouched(d, before, old)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=r"extra_files\['tokenizer.json'\]"):
        _model(seed=4).save_pretrained(str(d), extra_files={"tokenizer.json": str(d / "missing.json")})
    with pytest.raises(ValueError, match="extra_files: '../x'"):
        _model(seed=4).save_pretrained(str(d), extra_files={"../x": str(d / "README.md")})
    with torch.device("meta"):
        meta_model = PhiForCausalLM(_model().config)
    with pytest.raises(CheckpointError, match="meta device"):
        meta_model.save_pretrained(str(d))
    _assert_untouched(d, before, old)
    # The file a save replaces a directory with is refused, not clobbered.
    f = d.parent / "a_file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="a_file"):
        old.save_pretrained(str(f))
    assert f.read_text() == "x"


def test_unreadable_checkpoints_name_the_file(saved):
    d, _ = saved
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        PhiForCausalLM.from_pretrained(str(d))
    os.remove(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: no \"weight_map\""):
        PhiForCausalLM.from_pretrained(str(d))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        PhiForCausalLM.from_pretrained(str(d))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001.safetensors: weights file not found"):
        PhiForCausalLM.from_pretrained(str(d))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": "32"}))
    with pytest.raises(CheckpointError, match=r"config.json: PhiConfig.hidden_size expected an int, got str"):
        PhiForCausalLM.from_pretrained(str(d))
    (d / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        PhiForCausalLM.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "n_embd"} | {"n_embd": 32}))
    with pytest.raises(CheckpointError, match="config.json: missing field 'n_head'"):
        PhiForCausalLM.from_pretrained(str(d))


# ============================================================================ generate

@pytest.fixture(scope="module")
def gen_model():
    model = _model()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return model, calls


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="0.5"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"), (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_p=-0.1), "top_p"), (dict(temperature=1.0, top_p=float("nan")), "top_p"),
    (dict(temperature=1.0, top_k=-1), "top_k"), (dict(temperature=1.0, top_k=2.5), "top_k"),
    (dict(seed="1"), "seed"), (dict(eos_token_id=1.5), "eos_token_id"),
    (dict(max_new_tokens=2.0), "max_new_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=30), "max_new_tokens"),  # 3 + 30 > max_position_embeddings 32
    (dict(prompts=[1, 2.5, 3]), "token 1 is 2.5"), (dict(prompts=["1", 2]), "token 0 is '1'"),
    (dict(prompts=[True, 2]), "token 0 is True"), (dict(prompts=[1, VOCAB]), f"token id {VOCAB} at position 1"),
    (dict(prompts=[-1, 2]), "token id -1 at position 0"), (dict(prompts=[[1], [2, VOCAB + 5]]), "prompt 1: token id"),
    (dict(prompts=torch.tensor([1.0, 2.0])), "integer tensor"), (dict(prompts=[1, [2]]), "mixes token ids and lists"),
    (dict(prompts="hello"), "prompts must be a list"), (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
], ids=lambda v: repr(v)[:40] if not isinstance(v, str) else v)
def test_generate_rejects_bad_arguments_before_compute(gen_model, kwargs, name):
    model, calls = gen_model
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", [1, 2, 3])
    max_new = kwargs.pop("max_new_tokens", 4)
    calls.clear()
    with pytest.raises(ValueError, match=name if " " in name else rf"\b{name}\b"):
        generate(model, prompts, max_new, **kwargs)
    assert not calls, "the model ran before the arguments were checked"
    if isinstance(prompts, list) and all(isinstance(t, int) for t in prompts):
        with pytest.raises(ValueError, match=name if " " in name else rf"\b{name}\b"):
            generate_stream(model, prompts, max_new, **kwargs)  # eager: raised at the call, not at next()
        assert not calls


def test_generate_valid_edges_and_tensor_prompts(gen_model):
    model, _ = gen_model
    greedy = generate(model, [1, 2, 3], 5)
    assert generate(model, [1, 2, 3], 5, temperature=0.0, top_k=0, top_p=1.0) == greedy  # 0 / 1 = off
    assert generate(model, torch.tensor([1, 2, 3]), 5) == greedy  # a 1-D tensor is one prompt
    assert generate(model, torch.tensor([[1, 2, 3], [1, 2, 3]]), 5) == greedy * 2  # 2-D: a batch
    assert generate(model, [np.int64(1), 2, 3], 5) == greedy
    assert len(generate(model, [1, 2, 3], 29)[0]) == 29  # exactly max_position_embeddings
    assert list(generate_stream(model, [1, 2, 3], 5)) == greedy[0]
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 4), -0.5, None, None, None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
       top_k=st.one_of(st.none(), st.integers(-3, 80)),
       top_p=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)))
def test_sampling_arguments_property(temperature, top_k, top_p):
    """Any temperature / top_k / top_p: valid ones sample a token id in range, invalid ones are a
    ValueError naming the first bad argument; nothing in between."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    valid_t = math.isfinite(temperature) and temperature >= 0
    valid_k = top_k is None or top_k >= 0
    valid_p = top_p is None or 0 < top_p <= 1
    if valid_t and valid_k and valid_p:
        out = sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(1))
        assert out.shape == (2,) and 0 <= int(out.min()) and int(out.max()) < VOCAB
    else:
        first = "temperature" if not valid_t else "top_k" if not valid_k else "top_p"
        with pytest.raises(ValueError, match=first):
            sample_next(logits, temperature, top_k, top_p, None)


def test_generate_command_names_the_flag(capsys):
    for argv, flag in ((["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"),
                       (["--top-k", "-2"], "--top-k"), (["--max-new-tokens", "-1"], "--max-new-tokens")):
        with pytest.raises(SystemExit) as e:
            generate_main(["--checkpoint", "/nonexistent", "--prompt", "x"] + argv)
        assert e.value.code == 2 and flag in capsys.readouterr().err


# ============================================================================ fused loss and forward

@pytest.mark.parametrize("bad,match", [
    (VOCAB, rf"targets must be in \[0, {VOCAB}\)"), (VOCAB + 100, "targets must be in"), (-1, "targets must be in"),
    (-5, "targets must be in"), (-101, "targets must be in"),
])
def test_fused_loss_rejects_labels_like_cross_entropy(bad, match):
    h, w, b = torch.randn(6, 8), torch.randn(VOCAB, 8), torch.randn(VOCAB)
    t = torch.tensor([1, 2, -100, 3, 4, 5])
    t[3] = bad
    with pytest.raises(Exception):
        F.cross_entropy(F.linear(h, w, b), t, ignore_index=-100)  # the peer refuses it too
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(h, w, b, t)


def test_fused_loss_rejects_dtype_shape_and_device_of_labels():
    h, w = torch.randn(6, 8), torch.randn(VOCAB, 8)
    for t, match in ((torch.zeros(6, dtype=torch.int32), "targets must be int64"),
                     (torch.zeros(6), "targets must be int64"), (torch.zeros(5, dtype=torch.long), r"shape \(6,\)"),
                     (torch.zeros(6, 1, dtype=torch.long), r"shape \(6,\)"), ([0] * 6, "targets must be a tensor")):
        with pytest.raises((ValueError, TypeError), match=match):
            fused_linear_cross_entropy(h, w, None, t)
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_cross_entropy(h, w, None, torch.zeros(6, dtype=torch.long), chunk_rows=0)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cross_entropy(h, w, torch.zeros(3), torch.zeros(6, dtype=torch.long))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-102, VOCAB + 2), min_size=1, max_size=12))
def test_fused_loss_accepts_exactly_what_cross_entropy_accepts(labels):
    h, w = torch.randn(len(labels), 8, dtype=torch.float64), torch.randn(VOCAB, 8, dtype=torch.float64)
    t = torch.tensor(labels)
    try:
        expect = F.cross_entropy(F.linear(h, w), t, ignore_index=-100)
    except (IndexError, RuntimeError):
        with pytest.raises(ValueError, match="targets"):
            fused_linear_cross_entropy(h, w, None, t)
    else:
        got = fused_linear_cross_entropy(h, w, None, t)
        if not torch.isnan(expect):  # every label ignored: both NaN/0 conventions aside
            torch.testing.assert_close(got, expect.float(), rtol=1e-6, atol=1e-6)


def test_forward_names_input_ids_and_labels(gen_model):
    model, _ = gen_model
    x = torch.randint(0, VOCAB, (2, 5))
    for kwargs, match in ((dict(input_ids=x.float()), "input_ids must be int64"),
                          (dict(input_ids=x + VOCAB), rf"input_ids must be in \[0, vocab_size={VOCAB}\)"),
                          (dict(input_ids=x - VOCAB), "input_ids must be in"),
                          (dict(input_ids=x[0]), r"input_ids must be a \(batch, seqlen\)"),
                          (dict(input_ids=x, labels=x[:, :4]), "labels must be an int64 tensor shaped like input_ids"),
                          (dict(input_ids=x, labels=x.int()), "labels must be an int64"),
                          (dict(input_ids=x, labels=x + VOCAB), "labels must be in"),
                          (dict(input_ids=x, labels=x + VOCAB, return_logits=False), "labels must be in")):
        with pytest.raises(ValueError, match=match):
            model(**kwargs)


# ============================================================================ prepare_data and the loader

DOCS = [f"def f{i}(x):\n    return x + {i}\n" for i in range(60)]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    src = _jsonl(root / "src.jsonl", [{"text": t} for t in DOCS])
    out = root / "data"
    prepare(str(out), [src], vocab_size=300, val_every=5)
    return root, src, out


def test_reused_output_directory_is_refused_then_replaced_whole(tmp_path):
    src = _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS])
    out = tmp_path / "data"
    prepare(str(out), [src], vocab_size=300, val_every=5, shard_tokens=100)  # many small shards
    assert len([n for n in os.listdir(out) if n.startswith("train_")]) > 3
    small = _jsonl(tmp_path / "b.jsonl", [{"text": "x = 1\n"}] * 3)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"--out .*not empty.*--overwrite"):
        prepare(str(out), [small], vocab_size=300, val_every=0, shard_tokens=100)
    assert _snapshot(out) == before
    meta = prepare(str(out), [small], vocab_size=300, val_every=0, shard_tokens=100, overwrite=True)
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.json", "train_000.bin", "val_000.bin"]  # no stale shard
    loader = TokenLoader(str(out), "train", 2, 1)
    assert loader.n_windows * 2 <= meta["train_tokens"] == len(read_shard(str(out / "train_000.bin")))


def test_inputs_inside_the_output_and_output_inside_inputs_are_refused(prepared, tmp_path):
    root, src, out = prepared
    before = _snapshot(out)
    for inputs, match in (([str(out)], r"--input .* is inside --out"),
                          ([str(out / "tokenizer.json")], r"--input .* is inside --out"),
                          ([str(root)], r"--out .* is inside --input")):
        with pytest.raises(ValueError, match=match):
            prepare(str(out), inputs, vocab_size=300, overwrite=True)
    assert _snapshot(out) == before
    # The command line: the same refusal, exit status 2, the flag named.
    with pytest.raises(SystemExit) as e:
        prepare_main(["--out", str(out), "--input", str(out), "--overwrite"])
    assert e.value.code == 2
    assert _snapshot(out) == before


def test_document_values_and_file_types(tmp_path, capsys):
    rows = [{"text": "a = 1\n"}, {"text": None}, {"text": "   "}, {"text": "b = 2\n"}]
    d = tmp_path / "in"
    d.mkdir()
    _jsonl(d / "docs.jsonl", rows)
    (d / "image.png").write_bytes(b"\x89PNG")
    (d / "notes.docx").write_bytes(b"PK")
    meta = prepare(str(tmp_path / "o1"), [str(d)], vocab_size=280, val_every=0)
    assert meta["documents"] == 2 and meta["skipped_documents"] == {"null": 1, "empty": 1}
    assert meta["skipped_files"] == 2
    err = capsys.readouterr().err
    assert "2 file(s) of unknown type" in err and "image.png" in err and "1 null" in err
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "o1" / "tokenizer.json"))
    assert "None" not in tok.decode(np.asarray(read_shard(str(tmp_path / "o1" / "train_000.bin"))).tolist())
    for rows, match in (([{"text": 123}], r"docs.jsonl:1: field 'text' is int"),
                        ([{"text": ["a"]}], r"docs.jsonl:1: field 'text' is list"),
                        ([{"content": "a"}], r"docs.jsonl:1: no field 'text' \(use --field"),
                        ([["a"]], r"docs.jsonl:1: expected a JSON object")):
        _jsonl(d / "docs.jsonl", rows)
        with pytest.raises(ValueError, match=match):
            prepare(str(tmp_path / "o2"), [str(d)], vocab_size=280)
    (d / "docs.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: not valid JSON"):
        prepare(str(tmp_path / "o2"), [str(d)], vocab_size=280)
    with pytest.raises(ValueError, match=r"--input .*image.png: unknown file type"):
        prepare(str(tmp_path / "o2"), [str(d / "image.png")], vocab_size=280)
    with pytest.raises(FileNotFoundError, match=r"--input .*nope.jsonl"):
        prepare(str(tmp_path / "o2"), [str(d / "nope.jsonl")], vocab_size=280)
    for kwargs, match in ((dict(vocab_size=0), "--vocab-size"), (dict(val_every=-1), "--val-every"),
                          (dict(max_bytes=0), "--max-bytes"), (dict(field=""), "--field"),
                          (dict(tokenizer=str(tmp_path)), "--tokenizer")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            prepare(str(tmp_path / "o2"), [str(d)], **kwargs)
    assert not os.path.exists(tmp_path / "o2"), "a refused preparation wrote its output"


def test_loader_refuses_shards_that_do_not_match_meta(prepared, tmp_path):
    import shutil

    _, _, out = prepared
    d = tmp_path / "copy"
    shutil.copytree(out, d)
    TokenLoader(str(d), "train", 8, 2)  # as prepared: fine
    write_shard(str(d / "train_007.bin"), np.arange(100))  # a stale shard from an earlier run
    with pytest.raises(ValueError, match=r"train shards on disk .* are not the ones .*meta.json lists"):
        TokenLoader(str(d), "train", 8, 2)
    os.remove(d / "train_007.bin")
    meta = json.loads((d / "meta.json").read_text())
    del meta["shards"]  # a meta.json of an older version: the token count still has to agree
    meta["train_tokens"] += 140
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"hold \d+ tokens but .*meta.json says"):
        TokenLoader(str(d), "train", 8, 2)
    (d / "meta.json").write_text("{")
    with pytest.raises(ValueError, match=r"meta.json: not valid JSON"):
        TokenLoader(str(d), "train", 8, 2)
    os.remove(d / "meta.json")
    with pytest.raises(FileNotFoundError, match="meta.json: not found"):
        TokenLoader(str(d), "train", 8, 2)
    shard = d / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(ValueError, match=r"train_000.bin: truncated"):
        read_shard(str(shard))
    (d / "short.bin").write_bytes(b"PHI")
    with pytest.raises(ValueError, match=r"short.bin is not a phi-kernels token shard"):
        read_shard(str(d / "short.bin"))
    for kwargs, match in ((dict(seq_len=0), "seq_len"), (dict(micro_batch=-1), "micro_batch"),
                          (dict(rank=2, world=2), "rank")):
        with pytest.raises(ValueError, match=match):
            TokenLoader(str(out), "train", **{"seq_len": 8, "micro_batch": 2, **kwargs})
    before = shard.read_bytes()
    with pytest.raises(ValueError, match="train_000.bin: token ids must be in"):
        write_shard(str(shard), np.array([1, -1]))
    with pytest.raises(ValueError, match="integer ids"):
        write_shard(str(shard), np.array([1.5]))
    assert shard.read_bytes() == before


# ============================================================================ training flags

@pytest.mark.parametrize("overrides,flag", [
    (dict(lr=float("nan")), "--lr"), (dict(lr=float("inf")), "--lr"), (dict(lr=-1e-3), "--lr"), (dict(lr=0.0), "--lr"),
    (dict(eps=-1.0), "--eps"), (dict(eps=float("nan")), "--eps"),
    (dict(beta1=1.5), "--beta1"), (dict(beta1=1.0), "--beta1"), (dict(beta2=-0.1), "--beta2"),
    (dict(beta2=float("nan")), "--beta2"), (dict(seq_len=2048), "--seq-len 2048 exceeds"),
    (dict(seq_len=0), "--seq-len"),
    (dict(eval_batches=0), "--eval-batches"), (dict(optimizer_backend="bogus"), "--optimizer-backend"),
    (dict(max_steps=0), "--max-steps"), (dict(micro_batch_size=0), "--micro-batch-size"),
    (dict(grad_accum=-1), "--grad-accum"), (dict(warmup_steps=500), "--warmup-steps"),
    (dict(warmup_steps=-1), "--warmup-steps"), (dict(weight_decay=-0.1), "--weight-decay"),
    (dict(grad_clip=float("nan")), "--grad-clip"), (dict(min_lr=1.0), "--min-lr"), (dict(seed=-1), "--seed"),
    (dict(keep_last=0), "--keep-last"), (dict(log_interval=0), "--log-interval"),
    (dict(save_interval=0), "--save-interval"), (dict(eval_interval=-5), "--eval-interval"),
    (dict(peak_tflops=-1.0), "--peak-tflops"), (dict(zero_stage=5), "--zero-stage"),
    (dict(precision="fp8"), "--precision"),
    (dict(schedule="linear"), "--schedule"), (dict(model="phi-9"), "--model"),
    (dict(lr="3e-4"), "--lr expected a number"), (dict(max_steps=10.5), "--max-steps expected an integer"),
    (dict(resume="yes"), "--resume expected true or false"), (dict(resume=True), "--resume"),
], ids=lambda v: str(v)[:40])
def test_training_flags_are_validated_at_start(prepared, tmp_path, overrides, flag):
    _, _, data = prepared
    cfg = TrainConfig(**{"data": str(data), "out_dir": str(tmp_path / "out"), "seq_len": 16, "micro_batch_size": 2,
                         **overrides})
    with pytest.raises(SystemExit) as e:
        validate(cfg, 1)
    assert flag in str(e.value), str(e.value)


def test_training_flags_valid_and_environment_checks(prepared, tmp_path):
    _, _, data = prepared
    good = dict(data=str(data), out_dir=str(tmp_path / "out"), seq_len=16, micro_batch_size=2)
    validate(TrainConfig(**good), 1)  # the baseline is accepted
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--optimizer-backend cuda: not available here"):
            validate(TrainConfig(**good, optimizer_backend="cuda"), 1)
    ckpt = tmp_path / "out" / "checkpoints"
    (ckpt / "step_000004").mkdir(parents=True)
    (ckpt / "step_000004" / "COMPLETE").write_text("")
    (ckpt / "latest").write_text("step_000004")
    with pytest.raises(SystemExit, match=r"--out-dir .* already holds a run's checkpoints \(latest step_000004\)"):
        validate(TrainConfig(**good), 1)
    validate(TrainConfig(**good, resume=True), 1)
    (ckpt / "latest").write_text("step_000008")
    with pytest.raises(SystemExit, match="--out-dir .*names step_000008, which is not a complete checkpoint"):
        validate(TrainConfig(**good, resume=True), 1)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--out-dir .*not a directory"):
        validate(TrainConfig(**{**good, "out_dir": str(tmp_path / "file")}), 1)
    bad_meta = tmp_path / "bad_data"
    bad_meta.mkdir()
    (bad_meta / "meta.json").write_text('{"vocab_size": 300,')
    with pytest.raises(SystemExit, match=r"--data .*meta.json: not valid JSON"):
        validate(TrainConfig(**{**good, "data": str(bad_meta)}), 1)
    (bad_meta / "meta.json").write_text('{"vocab_size": 300}')
    with pytest.raises(SystemExit, match=r"meta.json: field 'eos_token_id' expected an int"):
        validate(TrainConfig(**{**good, "data": str(bad_meta)}), 1)
    model = tmp_path / "model.json"
    model.write_text('{"hidden_size": 32')
    with pytest.raises(SystemExit, match=r"--model .*model.json: not valid JSON"):
        validate(TrainConfig(**{**good, "model": str(model)}), 1)
    model.write_text(json.dumps({"hidden_size": "32"}))
    with pytest.raises(SystemExit, match=r"--model .*model.json: PhiConfig.hidden_size expected an int, got str"):
        validate(TrainConfig(**{**good, "model": str(model)}), 1)
    model.write_text(json.dumps({"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8}))
    with pytest.raises(SystemExit, match=r"--seq-len 16 exceeds the model's max_position_embeddings \(8"):
        validate(TrainConfig(**{**good, "model": str(model)}), 1)


@pytest.mark.parametrize("content,match", [
    ('{"lr": 3e-4,', r"--config .*cfg.json: not valid JSON"),
    ('[1, 2]', r"--config .*cfg.json: expected a JSON object"),
    ('{"lr": "3e-4"}', r"--config .*cfg.json: field 'lr' expected a number, got str"),
    ('{"max_steps": 10.5}', r"--config .*cfg.json: field 'max_steps' expected an integer, got float"),
    ('{"resume": "no"}', r"--config .*cfg.json: field 'resume' expected true or false"),
    ('{"optimizer_backend": 3}', r"--config .*cfg.json: field 'optimizer_backend' expected a string or null"),
    ('{"learning_rate": 1}', r"--config .*cfg.json: unknown fields \['learning_rate'\]"),
])
def test_config_file_errors_name_the_file_and_field(tmp_path, content, match):
    path = tmp_path / "cfg.json"
    path.write_text(content)
    with pytest.raises(SystemExit, match=match):
        parse_args(["--config", str(path)])


def test_pretrain_script_refuses_a_bad_flag_before_starting(prepared, tmp_path):
    """python train/pretrain.py --lr nan: non-zero exit, --lr named, nothing prepared or written,
    no process group (DeepSpeed is never imported)."""
    _, _, data = prepared
    before = _snapshot(data)
    out_dir = tmp_path / "out"
    env = subprocess_env(PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "train", "pretrain.py"), "--lr",
                           "nan", "--eps", "-1", "--data", str(data), "--out-dir", str(out_dir)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:")]
    assert any("--lr must be a finite number > 0, got nan" in ln for ln in err), proc.stderr[-2000:]
    assert any("--eps must be a finite number >= 0, got -1" in ln for ln in err)
    assert not any(ln.startswith("import time:") and "deepspeed" in ln for ln in proc.stderr.splitlines())
    assert not out_dir.exists() and _snapshot(data) == before
