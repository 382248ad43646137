"""`dpo train`: the loop (train), the step plan and batching (plan), checkpoints and resuming (checkpoint), the run
folder with its log and lock (runfolder), which recorded settings change the numbers (runsettings), per-pair step
statistics (stepstats), and TensorBoard event files rebuilt from metrics.jsonl (events).

May import dpo.core, dpo.data, dpo.engine and dpo.audit (docs/architecture.md).
"""
