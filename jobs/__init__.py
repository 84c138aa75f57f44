"""What runs on the Ray cluster: the fine-tuning job (``jobs.finetune``) and its parts."""
