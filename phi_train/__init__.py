"""phi-1.5 pretraining: data preparation (prepare_data.py), the loader (data.py), the run
configuration (config.py), the --dry-run plan (dry_run.py), atomic checkpoints (checkpoint.py)
and the script (pretrain.py)."""
