"""Preference data: HellaSwag items (hellaswag), the rows of your own files (sources, userdata), pairs with their
splits, prompt formats and label noise (pairs), and `dpo data`, which writes the pair files and their manifest
(prepare).

May import dpo.core (docs/architecture.md).
"""
