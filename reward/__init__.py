"""Reward models: train on preferences, evaluate, score."""
