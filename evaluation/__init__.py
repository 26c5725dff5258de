"""Evaluation: the paper's benchmarks through our sharded model.

    harness.py     lm-evaluation-harness tasks (MMLU, GSM8K, BBH, ...) and HumanEval generation;
                   the command `python -m evaluation.harness`
    humaneval.py   HumanEval's prompts, completion cutting, scoring by execution, pass@k
    server.py      the OpenAI API (chat, completions, streaming) with continuous batching on a mesh;
                   the command `python -m evaluation.server`
    openai_api.py  the API's requests, chat formats, stop strings and responses, without the web framework
"""
