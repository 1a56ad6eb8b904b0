"""``python -m dinov2.run.train.train``: the trainer as a submitit job that requeues itself."""
