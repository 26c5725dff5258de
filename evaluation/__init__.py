"""Evaluation: the paper's benchmarks through our sharded model.

    harness.py     lm-evaluation-harness tasks (MMLU, GSM8K, BBH, ...) and HumanEval generation;
                   the command `python -m evaluation.harness`
    humaneval.py   HumanEval's prompts, completion cutting, scoring by execution, pass@k
"""
