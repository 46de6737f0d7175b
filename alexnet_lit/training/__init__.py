"""Training: the LightningCLI behind ``scripts/train.py``, the dashboard callbacks, fault
tolerance, the learning-rate and batch-size finders, native mixed precision, schedules, and the
audits that train several models (label issues, the learning curve)."""
