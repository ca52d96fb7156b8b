"""Exact dense and sparse causal attention (CONTRACT §1 and §5)."""

from .attention import attention
from .patterns import Pattern, PatternBase, attended_pairs, parse_pattern

__all__ = ["Pattern", "PatternBase", "attended_pairs", "attention", "parse_pattern"]
