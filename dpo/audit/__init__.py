"""`dpo audit`: how noisy is a preference file, and which of its pairs are flipped (audit); and the audit `dpo train`
runs on its training file before training, for --label-fix and --eps auto|posterior (label_fix).

May import dpo.core, dpo.data and dpo.engine (docs/architecture.md).
"""
