"""Tools around a run, each a command run from the repository root as `python -m tools.NAME`.

    aot.py       compile the train step (or the decode steps) for a TPU slice on this machine: does it fit?
    convert.py   export a checkpoint as a Hugging Face directory (transformers, vLLM and the rest read it)
    plot.py      loss curves of one or more runs
    ablate.py    sweeps of config values (the code:text ablation), one run per point, and their table
    campaign.py  kill -9 a run again and again, resume it, compare with an uninterrupted run byte for byte
"""
