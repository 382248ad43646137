"""dpo-noise: how much preference-label quality can DPO trade for quantity?"""

__version__ = "0.1.0"
