"""Console scripts of the training package (pyproject.toml [project.scripts])."""
import runpy


def pretrain() -> None:
    """`phi-train [flags]`, the same as `python train/pretrain.py [flags]` (or under torchrun:
    `torchrun --nproc_per_node=N --no-python phi-train [flags]`)."""
    runpy.run_module("phi_train.pretrain", run_name="__main__", alter_sys=True)
