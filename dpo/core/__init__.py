"""The core: what every room uses. Files written safely and read with checks (files), every setting as a dataclass
with its flags (config), the loss table (losses), the metric table (metrics), the audit's pair scores (pairscores),
statistics (stats), and loading models and tokenizers (models).

May import nothing of dpo outside dpo.core (docs/architecture.md).
"""
