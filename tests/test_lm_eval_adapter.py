"""The lm-evaluation-harness model "phi_kernels" against lm-eval's own HFLM on the same tiny
HF-format Phi checkpoint, through lm-eval's whole pipeline, on local tasks (tests/data/lm_eval_local:
multiple choice, generation, rolling perplexity), with no network."""
from __future__ import annotations

import json
import os

import lm_eval
import pytest
from lm_eval.tasks import TaskManager  # the real one (a test below patches the module's name)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["phi_local_mc", "phi_local_gen", "phi_local_rolling"]
LOCAL_TASKS = os.path.join(REPO, "tests", "data", "lm_eval_local")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No network: the environment variables, and the flags datasets and huggingface_hub read at
    import (an earlier test may have imported them)."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.chdir(REPO)  # the tasks' data files are relative to the repository root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.eval_checkpoints import tiny_phi_checkpoint

    return tiny_phi_checkpoint(str(tmp_path_factory.mktemp("phi")))


def _local_task_manager(**kwargs):
    """A TaskManager of the local tasks only: indexing lm-eval's thousands of built-in task YAMLs
    takes most of a minute and is not what is tested here."""
    kwargs["include_path"] = LOCAL_TASKS
    kwargs["include_defaults"] = False
    return TaskManager(**kwargs)


def _evaluate(model: str, checkpoint: str, task_manager) -> dict:
    import phi_model.eval.lm_eval_adapter  # noqa: F401 - registers "phi_kernels"

    # max_length 64: the rolling task's texts need several windows
    return lm_eval.simple_evaluate(
        model=model, model_args=f"pretrained={checkpoint},dtype=float32,max_length=64", tasks=TASKS,
        task_manager=task_manager, log_samples=True, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def both(checkpoint):
    # module scope runs before the function-scoped _offline fixture: the same settings, here
    mp = pytest.MonkeyPatch()
    try:
        import datasets.config

        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
        mp.chdir(REPO)
        tasks = _local_task_manager()
        return {m: _evaluate(m, checkpoint, tasks) for m in ("phi_kernels", "hf")}
    finally:
        mp.undo()


def _responses(result: dict, task: str) -> list:
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_loglikelihoods_equal_hflm(both):
    ours, theirs = _responses(both["phi_kernels"], "phi_local_mc"), _responses(both["hf"], "phi_local_mc")
    assert len(ours) == 6 and all(len(doc) == 3 for doc in ours)
    for doc_ours, doc_theirs in zip(ours, theirs):
        for [(lp, greedy)], [(lp_ref, greedy_ref)] in zip(doc_ours, doc_theirs):
            assert lp == pytest.approx(lp_ref, abs=1e-4)
            assert greedy == greedy_ref
    for metric in ("acc,none", "acc_norm,none"):
        assert both["phi_kernels"]["results"]["phi_local_mc"][metric] == both["hf"]["results"]["phi_local_mc"][metric]


def test_rolling_loglikelihoods_equal_hflm(both):
    ours, theirs = _responses(both["phi_kernels"], "phi_local_rolling"), _responses(both["hf"], "phi_local_rolling")
    assert len(ours) == 2
    for [lp], [lp_ref] in zip(ours, theirs):
        # sums over ~150 tokens of a few nats each: 1e-4 is near float32's resolution there
        assert lp == pytest.approx(lp_ref, abs=1e-4, rel=1e-6)


def test_generations_equal_hflm_and_stop_at_until(both):
    ours, theirs = _responses(both["phi_kernels"], "phi_local_gen"), _responses(both["hf"], "phi_local_gen")
    assert len(ours) == 4
    assert ours == theirs  # greedy decoding of the same logits
    assert all("\n" not in text for [text] in ours)


def test_cli_registers_the_model_and_runs_lm_eval(checkpoint, tmp_path, capsys, monkeypatch):
    import lm_eval.tasks

    from phi_model.evaluate import main

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", _local_task_manager)  # the CLI's, at call time
    out = tmp_path / "out"
    assert main(["--lm-eval", "--model", "phi_kernels", "--model_args", f"pretrained={checkpoint},max_length=64",
                 "--tasks", "phi_local_mc", "--include_path", LOCAL_TASKS,
                 "--batch_size", "4", "--device", "cpu", "--output_path", str(out)]) == 0
    assert "phi_local_mc" in capsys.readouterr().out  # lm-eval's results table
    written = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.startswith("results")]
    assert len(written) == 1
    results = json.load(open(written[0]))["results"]["phi_local_mc"]
    assert 0 <= results["acc,none"] <= 1


def test_bad_model_args_are_refused(checkpoint):
    from phi_model.eval.lm_eval_adapter import PhiKernelsLM

    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        PhiKernelsLM(pretrained=checkpoint, batch_size="0")
    with pytest.raises(ValueError, match="dtype must be one of"):
        PhiKernelsLM(pretrained=checkpoint, dtype="float8")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        PhiKernelsLM(pretrained=os.path.join(checkpoint, "missing"))


def test_shared_prefixes_run_once_and_score_the_same(checkpoint):
    """Requests whose model input equals, or is a prefix of, another request's share its forward;
    each scores as it does alone."""
    from phi_model.eval.lm_eval_adapter import PhiKernelsLM

    lm = PhiKernelsLM(pretrained=checkpoint, batch_size=8, dtype="float32")
    requests = [(None, [5, 6, 7], [8]), (None, [5, 6, 7], [9]),  # same input (5, 6, 7)
                (None, [5, 6], [7, 8, 9]),                       # input (5, 6, 7, 8): hosts the two above
                (None, [5], [6]),                                # input (5,): a prefix too
                (None, [11, 12], [13, 14])]                      # unrelated
    rows_run = []
    logits = lm.lm.logits

    def counting(ids, lengths):
        rows_run.extend(lengths)
        return logits(ids, lengths)

    lm.lm.logits = counting
    together = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert sorted(rows_run) == [3, 4]  # two forwards: (5, 6, 7, 8) and (11, 12, 13)
    alone = [lm._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in requests]
    for (lp, greedy), (lp_alone, greedy_alone) in zip(together, alone):
        assert lp == pytest.approx(lp_alone, abs=1e-5) and greedy == greedy_alone


def test_cli_default_device_without_a_gpu(checkpoint):
    """lm-eval's CLI asks for cuda:0 unless told otherwise: without a GPU the model runs on the CPU."""
    import torch

    from phi_model.eval.lm_eval_adapter import PhiKernelsLM

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda:0 is used as asked")
    assert PhiKernelsLM(pretrained=checkpoint, device="cuda:0").device == torch.device("cpu")
