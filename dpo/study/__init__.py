"""Studies, `dpo sweep` and `dpo report`: the sweep file read, expanded and checked (sweep), its cells run locally,
one per GPU or on Slurm (runner, slurm), the records cells leave read back with checks (records), their results
collected (results), and the report's tables and plots (report, report_audit, report_plots, report_task).

May import every other room: dpo.core, dpo.data, dpo.engine, dpo.audit, dpo.train and dpo.eval. Within it, only
the report modules import the report modules (docs/architecture.md).
"""
