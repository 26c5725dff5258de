"""Files and storage: what the core reads and writes, in the formats users bring and take away.

    storage.py     local paths and bucket URLs (gs://...) behind one set of calls
    readers.py     corpus files of every format (jsonl, json, txt, parquet, .zst/.gz), the held-out
                   rule, the bad-record policy; `Source`, one entry of a data mixture
    demo.py        the built-in demo data (the stdlib corpus, its tokenizer, an instruction set)
    tokenizer.py   a sentencepiece model plus added tokens
    tensorfile.py  safetensors files read through memory maps, written one tensor at a time
    checkpoint.py  sharded, atomic, verified checkpoints; resuming from the newest that verifies
    hf.py          Hugging Face Llama checkpoints <-> our params, streamed slice by slice
    weights.py     a model from a checkpoint or a Hugging Face directory, in the layout asked for
    tracking.py    a run's metrics: metrics.jsonl, TensorBoard event files, W&B
"""
