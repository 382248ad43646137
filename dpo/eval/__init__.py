"""`dpo eval`: a model scored on HellaSwag (score), and lm-evaluation-harness tasks run on a run's weights
(harness).

May import dpo.core, dpo.data and dpo.engine (docs/architecture.md).
"""
