"""Evaluation: the paper's benchmarks through our sharded model.

    harness.py     lm-evaluation-harness tasks (MMLU, GSM8K, BBH, ...) and HumanEval generation;
                   the command `python -m evaluation.harness`
    humaneval.py   HumanEval's prompts, completion cutting, scoring by execution, pass@k
    sandbox.py     the one module that runs model-written code (programs, and persistent shells)
    mint_tasks.py  MINT's tasks: loading, the first message, each subset's success rule
    mint_env.py    MINT's environment as a step function: Episode(task, budget).step(text)
    mint_replay.py MINT's recorded runs replayed through our environment, turn by turn
    agent.py       Lemur as an agent: `python -m evaluation.agent` runs MINT live, on our model batched
                   on a mesh or on any OpenAI endpoint, and replays MINT's runs (docs/agents.md)
    server.py      the OpenAI API (chat, completions, streaming) with continuous batching on a mesh;
                   the command `python -m evaluation.server`
    openai_api.py  the API's requests, chat formats, stop strings and responses, without the web framework
"""
