"""Evaluation: full-ranking metrics and attribute-inference attackers."""

from lego_jax.evaluation.attackers import attack, attack_loop
from lego_jax.evaluation.ranking import evaluate, group_means, popularity_scores

__all__ = ["attack", "attack_loop", "evaluate", "group_means", "popularity_scores"]
