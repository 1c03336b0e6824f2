"""Pieces shared by raysmith's RL algorithms."""
