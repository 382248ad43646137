"""The log-prob engine that training and the audit share: tokenized pairs and their log-probs (logprobs), LoRA
adapters (lora), the precision a machine runs at (precision), data-parallel processes (distributed), and the
reference model's pass over the pairs with its cache (reference, refcache).

May import dpo.core and dpo.data (docs/architecture.md).
"""
