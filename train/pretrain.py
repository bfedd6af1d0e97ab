"""The launcher the README names: `torchrun --nproc_per_node=2 train/pretrain.py [flags]`.

The training script is phi_train/pretrain.py (installed with the package, also as the console
script `phi-train`); this file only runs it, so the command works from a checkout.
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("phi_train.pretrain", run_name="__main__", alter_sys=True)
