"""Training stages: each states its batch, its loss and its metrics, and reuses omni.train.trainer."""
