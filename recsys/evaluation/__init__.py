"""Offline evaluation: ranking metrics, baselines, reports."""
