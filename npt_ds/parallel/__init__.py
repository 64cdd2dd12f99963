"""Parallel set-up: process groups, devices, the DeepSpeed config, ZeRO-3's frozen base, cluster env and hostfiles."""
