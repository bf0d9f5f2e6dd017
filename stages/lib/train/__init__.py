"""The train stage's helpers: launching ranks, the trainer, attention kernels, telemetry, ZeRO-3 memory."""
