"""kforcing: K-Forcing (push-forward, joint next-k-token decoding) on top of kforcing_ops."""
