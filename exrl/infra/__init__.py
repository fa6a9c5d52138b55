"""Run infrastructure: checkpoints, meshes, multi-host set-up, metrics and plots."""
