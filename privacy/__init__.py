"""Differential privacy: DP-SGD training with Opacus, accounting, the privacy ledger and report."""
