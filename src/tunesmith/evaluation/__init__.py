"""Evaluation: metrics, generation, compare, forgetting, result cache.

Public entry points: `tunesmith.evaluation.api.evaluate` / `.compare` and
`tunesmith.evaluation.forgetting.measure_reference` / `.forgetting_deltas`. Nothing is imported
here, so `import tunesmith.evaluation.generate` stays light (no sklearn, sacrebleu).
"""
